"""Metrics that alerts depend on, on a real daemon and the sandbox: series that exist at
zero, a model label attackers cannot inflate, gauges computed at scrape time (outbox age,
why the poller is idle)."""

from __future__ import annotations

import trio
from prometheus_client import generate_latest

from processor.daemon import Daemon
from processor.effects.metrics import OTHER_MODEL, PAUSE_REASONS, Metrics
from processor.pure.tasks import RejectReason
from processor.sandbox import serve_asgi
from processor.sandbox.app import Fault
from processor.sandbox.fake_backends import FakeBackendState, FakeEmbeddings
from tests.conftest import make_settings, running, wait_until

EPOCH = 1_800_000_000.0


def labels_of(m: Metrics, name: str, label: str) -> set[str]:
    return {s.labels[label] for fam in m.registry.collect() for s in fam.samples if s.name == name and label in s.labels}


def test_model_label_keeps_configured_names_and_folds_the_rest() -> None:
    m = Metrics(models=["nomic-embed-text", "text-embedding-3-small"])
    assert m.model_label("nomic-embed-text") == "nomic-embed-text"
    assert m.model_label("nomic-embed-text:latest") == "nomic-embed-text:latest"
    assert m.model_label("text-embedding-3-small") == "text-embedding-3-small"
    assert m.model_label("x" * 200) == OTHER_MODEL
    for i in range(50):
        m.openai_requests.labels(f"attacker-{i}", "success").inc()
        m.backend_requests.labels(backend="openai", model=f"attacker-{i}", outcome="success").inc()
    assert labels_of(m, "openai_requests_total", "model") == {OTHER_MODEL}
    assert m.registry.get_sample_value("openai_requests_total", {"model": OTHER_MODEL, "status": "success"}) == 50
    assert labels_of(m, "embedding_requests_total", "model") == {OTHER_MODEL}


async def test_daemon_bounds_model_labels_from_task_content(sandbox, tmp_path, nursery) -> None:
    stop = trio.Event()
    fake = await nursery.start(lambda task_status: serve_asgi(FakeEmbeddings(FakeBackendState(base=0.001, per_input=0.0)), "127.0.0.1", 0,
                                                              shutdown=stop, task_status=task_status))
    for i in range(15):
        sandbox.state.seed(2, model=f"made-up-model-{i}")
    sandbox.state.seed(3, model="text-embedding-3-small")
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="openai", OPENAI_API_KEY="sk-test-0000000000000000",
                             OPENAI_BASE_URL=f"{fake}/v1", DEFAULT_MODEL="text-embedding-3-small")
    daemon = Daemon(settings, health=None)
    async with running(daemon):
        await wait_until(lambda: sandbox.state.by_state().get("succeeded", 0) == 33)
    stop.set()
    m = daemon.metrics
    for name in ("openai_requests_total", "openai_tokens_used_total", "embedding_requests_total"):
        assert labels_of(m, name, "model") <= {"text-embedding-3-small", OTHER_MODEL, *settings.supported_models}, name
    assert m.registry.get_sample_value("embedding_requests_total", {"backend": "openai", "model": OTHER_MODEL, "outcome": "success"}) >= 1


async def test_labelled_counters_exist_at_zero_before_anything_happens(sandbox, tmp_path) -> None:
    settings = make_settings(sandbox, tmp_path)
    daemon = Daemon(settings, health=None)
    async with running(daemon):
        m = daemon.metrics
        get = m.registry.get_sample_value
        assert get("ai_tasks_processed_total", {"task_type": "text_embedding", "status": "failed"}) == 0
        assert get("ai_tasks_processed_total", {"task_type": "text_embedding", "status": "succeeded"}) == 0
        for reason in RejectReason:
            assert get("ai_tasks_rejected_total", {"reason": reason.value}) == 0, reason
        assert get("embedding_requests_total", {"backend": "mock", "model": settings.default_model, "outcome": "server"}) == 0
        assert get("embedding_quota_exhausted", {"backend": "mock"}) == 0
        assert get("circuit_breaker_state", {"service": "task_api"}) == 0
        assert get("oauth2_token_fetches_total", {"outcome": "error"}) == 0
        assert get("process_start_time_seconds") is not None


def test_pre_created_outcomes_are_the_adapters_fault_values() -> None:
    from processor.effects.metrics import EMBED_OUTCOMES
    from processor.pure.faults import Fault

    assert set(EMBED_OUTCOMES) - {"success"} <= {f.value for f in Fault}


async def test_outbox_age_grows_at_scrape_time_while_reports_fail(sandbox, tmp_path) -> None:
    now = [EPOCH]
    sandbox.state.faults["patch"] = Fault(status=503, only_state="succeeded")
    ids = sandbox.state.seed(3)
    settings = make_settings(sandbox, tmp_path, RETRY_MAX_DELAY_SECONDS="0.5")
    daemon = Daemon(settings, health=None, clock=lambda: now[0])
    async with running(daemon):
        get = daemon.metrics.registry.get_sample_value
        await wait_until(lambda: get("processor_outbox_size") == 3)
        assert get("processor_outbox_oldest_age_seconds") == 0
        now[0] += 700  # nothing happens in the daemon: only the scrape sees the time pass
        assert get("processor_outbox_oldest_age_seconds") == 700
        now[0] += 300
        assert b"processor_outbox_oldest_age_seconds 1000.0" in generate_latest(daemon.metrics.registry)
        del sandbox.state.faults["patch"]
        await wait_until(lambda: all(sandbox.state.tasks[i]["state"] == "succeeded" for i in ids))
        await wait_until(lambda: get("processor_outbox_size") == 0)
        assert get("processor_outbox_oldest_age_seconds") == 0


async def test_intake_paused_says_why_the_poller_is_idle(sandbox, tmp_path) -> None:
    sandbox.state.seed(12)
    settings = make_settings(sandbox, tmp_path, RATE_LIMIT_ENABLED="true", RATE_LIMIT_PER_HOUR="5")
    daemon = Daemon(settings, health=None)
    async with running(daemon):
        get = daemon.metrics.registry.get_sample_value
        for reason in PAUSE_REASONS:
            assert get("processor_intake_paused", {"reason": reason}) is not None, reason
        await wait_until(lambda: get("processor_intake_paused", {"reason": "rate_limited"}) == 1)
        assert get("processor_intake_paused", {"reason": "api_breaker_open"}) == 0
        assert get("ai_tasks_pending_backlog_age_seconds") is not None
        daemon.stop()
        await wait_until(lambda: get("processor_intake_paused", {"reason": "shutting_down"}) == 1)
