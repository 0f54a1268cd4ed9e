"""The command line, as a user runs it (subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import processor

PY = [sys.executable, "-m", "processor"]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OAUTH2_", "OPENAI_", "API_", "PROCESSING_", "ORY_"))}
    return subprocess.run([*PY, *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout, cwd="/")


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and processor.__version__ in r.stdout
    for sub in ([], ["run"], ["check"], ["sandbox"], ["demo"], ["limits"]):
        r = run(*sub, "--help")
        assert r.returncode == 0 and "usage" in r.stdout.lower(), sub


def test_bad_configuration_exits_2_with_every_problem_and_no_traceback():
    r = run("run", env={"API_BASE_URL": "nope", "CONCURRENCY_LIMIT": "abc", "OAUTH2_CLIENT_SECRET": "s3cr3t-value"})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    for name in ("API_BASE_URL", "CONCURRENCY_LIMIT", "OAUTH2_TOKEN_URL", "OAUTH2_CLIENT_ID"):
        assert name in r.stderr
    assert "s3cr3t-value" not in r.stderr + r.stdout


def test_unknown_command_is_a_usage_error():
    assert run("frobnicate").returncode == 2


@pytest.fixture
def sandbox_process():
    proc = subprocess.Popen([*PY, "sandbox", "--port", "0", "--seed", "3"], stdout=subprocess.PIPE, text=True, cwd="/")
    url = None
    deadline = time.time() + 30
    assert proc.stdout is not None
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line:
            url = line.rsplit(" ", 1)[-1].strip()
            break
    assert url, "sandbox did not start"
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def _env(url: str, **extra: str) -> dict[str, str]:
    return {"API_BASE_URL": url, "OAUTH2_TOKEN_URL": f"{url}/oauth2/token", "OAUTH2_CLIENT_ID": "sandbox-client",
            "OAUTH2_CLIENT_SECRET": "sandbox-secret", "PROCESSING_MODE": "mock", **extra}


def test_check_passes_against_the_sandbox(sandbox_process):
    r = run("check", env=_env(sandbox_process))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "token endpoint: OK" in r.stdout and "task API (GET /api/ai-tasks/pending): OK" in r.stdout
    assert "mock backend: OK" in r.stdout


def test_check_names_a_wrong_secret(sandbox_process):
    r = run("check", env=_env(sandbox_process, OAUTH2_CLIENT_SECRET="wrong-secret-xyz"))
    assert r.returncode == 1
    assert "token endpoint: FAIL" in r.stdout and "invalid_client" in r.stdout
    assert "OAUTH2_CLIENT_ID / OAUTH2_CLIENT_SECRET" in r.stdout
    assert "wrong-secret-xyz" not in r.stdout + r.stderr


def test_check_names_an_unreachable_api(sandbox_process):
    r = run("check", env=_env(sandbox_process, API_BASE_URL="http://127.0.0.1:9"))
    assert r.returncode == 1 and "task API (GET /api/ai-tasks/pending): FAIL" in r.stdout


def test_demo_runs_end_to_end():
    r = run("demo", "--tasks", "120", env={"PROCESSING_MODE": "mock"}, timeout=120)  # local model: tests/deploy/test_local_backend.py
    assert r.returncode == 0, r.stdout + r.stderr
    assert "succeeded    120" in r.stdout and "in_progress  0" in r.stdout and "pending      0" in r.stdout
    assert "1024 dimensions, L2 norm 1.000000" in r.stdout
    r = run("demo", "--tasks", "50", "--malformed", env={"PROCESSING_MODE": "mock"}, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failed       4" in r.stdout and "pending      2" in r.stdout


def test_limits_reads_the_store(tmp_path):
    env = {"API_BASE_URL": "http://127.0.0.1:9", "OAUTH2_TOKEN_URL": "http://127.0.0.1:9/t", "OAUTH2_CLIENT_ID": "a",
           "OAUTH2_CLIENT_SECRET": "b", "PROCESSING_MODE": "mock", "STATE_DIR": str(tmp_path), "RATE_LIMIT_PER_MINUTE": "20",
           "RATE_LIMIT_PER_DAY": "500"}
    r = run("limits", env=env)
    assert r.returncode == 0, r.stderr
    assert "minute" in r.stdout and "20" in r.stdout and "day" in r.stdout and "500" in r.stdout


def test_start_up_error_exits_1_with_a_clear_line_and_no_traceback(tmp_path):
    env = {"API_BASE_URL": "http://127.0.0.1:9", "OAUTH2_TOKEN_URL": "http://127.0.0.1:9/t", "OAUTH2_CLIENT_ID": "a",
           "OAUTH2_CLIENT_SECRET": "b", "PROCESSING_MODE": "ollama", "OLLAMA_BASE_URL": "http://127.0.0.1:9",
           "OLLAMA_MODEL_DOWNLOAD_TIMEOUT": "2",  # also bounds the wait for an Ollama that is not up
           "STATE_DIR": str(tmp_path), "METRICS_PORT": "0"}
    r = run("run", env=env)
    assert r.returncode == 1
    assert "startup_failed" in r.stdout and "unreachable" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_metrics_port_in_use_is_a_clear_start_up_error(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {"API_BASE_URL": "http://127.0.0.1:9", "OAUTH2_TOKEN_URL": "http://127.0.0.1:9/t", "OAUTH2_CLIENT_ID": "a",
               "OAUTH2_CLIENT_SECRET": "b", "PROCESSING_MODE": "mock", "STATE_DIR": str(tmp_path),
               "METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(port)}
        r = run("run", env=env)
    assert r.returncode == 1 and "METRICS_PORT" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
