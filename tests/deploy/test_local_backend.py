"""The `local` backend: WordLlama's bundled weights, in-process, no network."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys

import pytest
import trio

from processor.config import ConfigError, Mode, load_settings
from processor.daemon import Daemon, StartupError
from processor.effects.backends.base import EmbedError
from processor.effects.backends.local import DEMO_CLAIMS, FULL_DIM, LocalBackend, nearest_neighbours
from processor.effects.metrics import Metrics
from processor.pure.tasks import Backend
from processor.wiring import build_backends
from tests.conftest import make_settings, running, wait_until


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_vectors_are_unit_length_256_dims_deterministic_and_mean_something() -> None:
    b = LocalBackend()
    await b.start()
    texts = ["Vaccines cause autism in children.", "Childhood immunisation is linked to autism.",
             "The Great Wall of China is visible from space with the naked eye."]
    r = await b.embed("any-model-name", texts)
    assert [len(v) for v in r.vectors] == [FULL_DIM] * 3
    assert all(abs(math.hypot(*v) - 1.0) < 1e-5 for v in r.vectors)
    assert all(isinstance(x, float) and math.isfinite(x) for v in r.vectors for x in v)
    assert cosine(r.vectors[0], r.vectors[1]) > cosine(r.vectors[0], r.vectors[2]) + 0.2
    again = await b.embed("other-name", texts[:1])
    assert again.vectors[0] == r.vectors[0]  # the model name chooses nothing in local mode


async def test_truncated_dimensions_and_a_size_it_cannot_give() -> None:
    b = LocalBackend(128)
    r = await b.embed("m", ["one claim"])
    assert len(r.vectors[0]) == 128 and abs(math.hypot(*r.vectors[0]) - 1.0) < 1e-5
    with pytest.raises(EmbedError, match="not 1024"):
        await LocalBackend(1024).embed("m", ["x"])


async def test_a_timeout_is_a_timeout_fault() -> None:
    b = LocalBackend()
    await b.start()
    with pytest.raises(EmbedError) as err:
        await b.embed("m", ["a claim " * 50] * 2000, timeout=0)
    assert err.value.fault.value == "timeout"
    assert len((await b.embed("m", ["after a timeout"], timeout=60)).vectors) == 1


async def test_loading_leaves_the_root_logger_alone() -> None:
    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    await LocalBackend().start()
    assert (root.handlers[:], root.level) == before


def test_settings_local_mode_defaults_to_256_dimensions(tmp_path) -> None:
    env = {"API_BASE_URL": "http://127.0.0.1:9", "OAUTH2_TOKEN_URL": "http://127.0.0.1:9/t", "OAUTH2_CLIENT_ID": "a",
           "OAUTH2_CLIENT_SECRET": "b", "PROCESSING_MODE": "local", "STATE_DIR": str(tmp_path)}
    settings, _ = load_settings(env, dotenv_path=None)
    assert settings.processing_mode is Mode.LOCAL and settings.embedding_dimensions == 256
    assert list(build_backends(settings, Metrics())) == [Backend.LOCAL]
    with pytest.raises(ConfigError):
        load_settings({**env, "PROCESSING_MODE": "lokal"}, dotenv_path=None)


async def test_daemon_in_local_mode_reports_real_vectors(sandbox, tmp_path) -> None:
    ids = sandbox.state.seed(30, text_size=120, model="whatever-the-task-says")
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="local")
    async with running(Daemon(settings, health=None)):
        await wait_until(lambda: all(sandbox.state.tasks[i]["state"] == "succeeded" for i in ids))
    for i in ids:
        v = sandbox.state.tasks[i]["result"]
        assert len(v) == 256 and abs(math.hypot(*v) - 1.0) < 1e-5


async def test_daemon_refuses_to_start_with_dimensions_the_model_cannot_give(sandbox, tmp_path) -> None:
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="local", EMBEDDING_DIMENSIONS="1024")
    with pytest.raises(StartupError, match="local backend: .*not 1024"):
        with trio.fail_after(120):
            await Daemon(settings, health=None).run()


def test_nearest_neighbours_orders_by_cosine() -> None:
    cands = [("a", [1.0, 0.0]), ("b", [0.6, 0.8]), ("c", [-1.0, 0.0])]
    assert nearest_neighbours([2.0, 0.0], cands, k=2) == [(1.0, "a"), (pytest.approx(0.6), "b")]


def test_demo_uses_the_local_model_and_prints_neighbours_that_make_sense() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROCESSING_", "OPENAI_", "API_", "OAUTH2_"))}
    r = subprocess.run([sys.executable, "-m", "processor", "demo", "--tasks", "60"], env=env, capture_output=True, text=True,
                       timeout=180, cwd="/")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mode=local" in r.stdout and "256 dimensions, L2 norm 1.000000" in r.stdout
    lines = r.stdout.splitlines()
    at = lines.index(f"  {DEMO_CLAIMS[0]}")  # "Vaccines cause autism in children."
    best = lines[at + 1].split("  ", 2)[-1]
    assert "autis" in best, lines[at : at + 3]
    at = lines.index(f"  {DEMO_CLAIMS[22]}")  # 5G and the coronavirus
    assert "COVID" in lines[at + 1], lines[at : at + 3]
    assert "INFO:" not in r.stderr  # no library logging leaks past the log pipeline
