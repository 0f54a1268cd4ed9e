"""Shared fixtures: a real sandbox API on loopback, settings, and a daemon runner."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, settings

from processor.config import Settings, load_settings
from processor.daemon import Daemon
from processor.effects.backends.base import EmbedResult
from processor.effects.backends.mock import MockBackend
from processor.effects.logs import configure_logging
from processor.sandbox import SandboxApp, SandboxState, serve_asgi

configure_logging("WARNING", "json")

# No test may depend on how fast this machine is today: Hypothesis's per-example deadline
# (200 ms by default) and its "data generation is slow" health check are wall-clock bounds,
# and CI runs on a busy 2-core machine. Tests that set their own `settings` inherit this.
settings.register_profile("processor", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("processor")


# The suite runs on three pytest-xdist workers (pyproject's addopts), which `--dist load`
# hands tests round robin from the front of the collection. These tests take one to four
# minutes each (most of it waiting: default 30 s polling, Prometheus `for:` clocks, a
# per-minute window), so they go first, longest first, each to its own worker, instead of
# starting last and leaving the other workers idle. Measured with `--durations`; a name that
# no longer matches only loses its place, nothing else.
LONG_FIRST = (
    "tests/deploy/test_prometheus_alerts.py::test_every_alert_fires_and_resolves_on_real_scrapes",
    "tests/test_triage_e2e.py::test_100_claims_with_30_percent_bad_answers",
    "tests/test_triage_e2e.py::test_100_claims_at_default_polling_and_concurrency",
    "tests/test_redis.py::test_a_global_per_minute_limit_is_shared_by_three_replicas",
    "tests/hostile/test_properties.py::test_every_property_holds_in_a_hostile_world_openai",
    "tests/test_redis.py::test_three_replicas_drain_without_embedding_any_task_twice",
    "tests/hostile/test_slow_backend.py::test_a_slow_cpu_server_is_measured_first_and_never_made_to_compute_abandoned_work",
    "tests/test_redis.py::test_redis_down_mid_run_fails_closed_and_resumes",
    "tests/hostile/test_properties.py::test_every_property_holds_in_a_hostile_world_ollama",
    "tests/hostile/test_properties.py::test_every_property_holds_in_a_hostile_world_two_replicas_on_redis",
    "tests/hostile/test_properties.py::test_every_property_holds_in_a_hostile_world_hybrid",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {nodeid: i for i, nodeid in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid, len(rank)))  # stable: the rest keep their order


@attrs.define
class Sandbox:
    state: SandboxState
    url: str


@pytest.fixture
async def sandbox(nursery) -> AsyncIterator[Sandbox]:
    state = SandboxState()
    stop = trio.Event()
    url = await nursery.start(lambda task_status: serve_asgi(SandboxApp(state), "127.0.0.1", 0, shutdown=stop, task_status=task_status))
    yield Sandbox(state, url)
    stop.set()


def sandbox_env(sb: Sandbox, tmp_path, **extra: Any) -> dict[str, str]:
    env = {
        "API_BASE_URL": sb.url,
        "OAUTH2_TOKEN_URL": f"{sb.url}/oauth2/token",
        "OAUTH2_CLIENT_ID": sb.state.client_id,
        "OAUTH2_CLIENT_SECRET": sb.state.client_secret,
        "PROCESSING_MODE": "mock",
        "POLLING_INTERVAL_SECONDS": "0.2",
        "STATE_DIR": str(tmp_path / "state"),
        "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": "0",
        "RATE_LIMIT_ENABLED": "false",
        "SHUTDOWN_GRACE_SECONDS": "5",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def make_settings(sb: Sandbox, tmp_path, **extra: Any) -> Settings:
    settings, _ = load_settings(sandbox_env(sb, tmp_path, **extra), dotenv_path=None)
    return settings


class CountingBackend(MockBackend):
    """A stand-in for a real embedding server: mock vectors, optional latency, and a count
    of how many times each text was embedded."""

    def __init__(self, dim: int = 1024, *, delay: float = 0.0, per_input: float = 0.0) -> None:
        super().__init__(dim)
        self.delay = delay
        self.per_input = per_input
        self.per_text: Counter[str] = Counter()
        self.batch_sizes: list[int] = []

    async def embed(self, model: str, texts: Sequence[str]) -> EmbedResult:
        if self.delay or self.per_input:
            await trio.sleep(self.delay + self.per_input * len(texts))
        self.per_text.update(texts)
        self.batch_sizes.append(len(texts))
        return await super().embed(model, texts)


@asynccontextmanager
async def running(daemon: Daemon) -> AsyncIterator[Daemon]:
    async with trio.open_nursery() as n:
        n.start_soon(daemon.run)
        with trio.fail_after(120):  # only turns a hang into a failure
            await daemon.started.wait()
        try:
            yield daemon
        finally:
            daemon.stop()


async def wait_until(pred: Callable[[], bool], timeout: float = 120.0, poll: float = 0.02) -> None:
    """Poll `pred`; the timeout only turns a hang into a failure (generous: CI is a busy machine)."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(poll)


def all_done(state: SandboxState, n: int) -> Callable[[], bool]:
    def pred() -> bool:
        c = state.by_state()
        return c.get("succeeded", 0) + c.get("failed", 0) >= n and c.get("in_progress", 0) == 0

    return pred


def is_unit_vector(v: Any, dim: int) -> bool:
    return isinstance(v, list) and len(v) == dim and abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-6


@pytest.fixture
def captured_logs():
    """Every log event (all levels) as dicts, after the redaction step."""
    import structlog

    configure_logging("DEBUG", "json")
    with structlog.testing.capture_logs() as logs:
        yield logs
    configure_logging("WARNING", "json")
