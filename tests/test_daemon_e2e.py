"""End to end against the sandbox: the real daemon, a real HTTP server on loopback."""

from __future__ import annotations

import trio

from processor.daemon import Daemon
from processor.pure.tasks import Backend
from tests.conftest import CountingBackend, all_done, is_unit_vector, make_settings, running, wait_until


async def test_drains_every_task_with_valid_vectors(sandbox, tmp_path):
    ids = sandbox.state.seed(300)
    backend = CountingBackend()
    daemon = Daemon(make_settings(sandbox, tmp_path), backends={Backend.MOCK: backend})
    async with running(daemon):
        await wait_until(all_done(sandbox.state, 300))
    st = sandbox.state
    assert st.by_state() == {"succeeded": 300}
    for i in ids:
        assert is_unit_vector(st.tasks[i]["result"], 1024)
        assert st.patch_counts[i] == 2  # in_progress, then succeeded
        assert st.callbacks[i] == 1
    states = [p.state for p in st.patches if p.task_id == ids[0]]
    assert states == ["in_progress", "succeeded"]
    assert max(backend.per_text.values()) == 1
    assert max(backend.batch_sizes) > 1  # a backlog is batched


async def test_malformed_entries_fail_with_reasons_and_never_stop_the_others(sandbox, tmp_path):
    good = sandbox.state.seed(50)
    bad = sandbox.state.seed_malformed()
    daemon = Daemon(make_settings(sandbox, tmp_path, PROCESSING_MODE="ollama", SUPPORTED_MODELS="nomic-embed-text"),
                    backends={Backend.OLLAMA: CountingBackend(768)})
    async with running(daemon):
        await wait_until(all_done(sandbox.state, 54))
        await trio.sleep(0.5)  # a few more polls: nothing else may change
        unservable = daemon.health()["models_unservable"]
    st = sandbox.state
    for i in good:
        assert st.tasks[i]["state"] == "succeeded" and len(st.tasks[i]["result"]) == 768
    reasons = {p.task_id: p.body.get("reason") for p in st.patches if p.state == "failed"}
    assert all(p.body.get("error") == p.body.get("reason") for p in st.patches if p.state == "failed")
    for kind in ("null_content", "number_content", "empty_text", "too_long"):
        assert st.tasks[bad[kind]]["state"] == "failed", kind
        assert st.tasks[bad[kind]]["result"] is None  # `result: null` and a reason
        assert reasons[bad[kind]], kind
    # a model this deployment does not serve is not the task's defect (CONTRACT §1): it stays
    # pending, unpatched, counted, and named in /health
    assert st.tasks[bad["unknown_model"]]["state"] == "pending"
    assert st.patch_counts[bad["unknown_model"]] == 0
    assert any("not served" in why for why in unservable.values())
    assert "10000" in reasons[bad["too_long"]]
    # an unknown type stays pending for a worker that handles it; nobody PATCHed it
    assert st.tasks[bad["unknown_type"]]["state"] == "pending"
    assert st.patch_counts[bad["unknown_type"]] == 0
    assert daemon.metrics.registry.get_sample_value("ai_tasks_skipped_total", {"task_type": "image_caption"}) == 1
    assert daemon.metrics.registry.get_sample_value("ai_tasks_rejected_total", {"reason": "missing_id"}) == 1


async def test_a_task_in_flight_is_never_taken_twice(sandbox, tmp_path):
    """A slow backend and fast polling: polls keep listing claimed-but-unfinished work."""
    ids = sandbox.state.seed(40)
    backend = CountingBackend(delay=0.3)
    settings = make_settings(sandbox, tmp_path, POLLING_INTERVAL_SECONDS="0.05", MAX_BATCH_SIZE="8", CONCURRENCY_LIMIT="2")
    daemon = Daemon(settings, backends={Backend.MOCK: backend})
    async with running(daemon):
        await wait_until(all_done(sandbox.state, 40))
    st = sandbox.state
    assert all(st.patch_counts[i] == 2 for i in ids)
    assert sum(1 for p in st.patches if p.state == "in_progress") == 40
    assert max(backend.per_text.values()) == 1


async def test_intake_is_bounded_whatever_the_backlog(sandbox, tmp_path):
    sandbox.state.seed(600)
    backend = CountingBackend(delay=0.05)
    settings = make_settings(sandbox, tmp_path, INTAKE_CAPACITY="32", MAX_BATCH_SIZE="16")
    daemon = Daemon(settings, backends={Backend.MOCK: backend})
    peak = 0
    async with running(daemon):
        with trio.fail_after(300):
            while not all_done(sandbox.state, 600)():
                peak = max(peak, len(daemon.pipeline.book))
                in_progress = sandbox.state.by_state().get("in_progress", 0)
                assert in_progress <= 32
                await trio.sleep(0.01)
    assert 0 < peak <= 32
    assert sandbox.state.by_state() == {"succeeded": 600}


async def test_token_expiry_mid_run_fails_nothing(sandbox, tmp_path):
    sandbox.state.token_lifetime = 2.0
    sandbox.state.seed(150)
    backend = CountingBackend(delay=0.25)
    settings = make_settings(sandbox, tmp_path, MAX_BATCH_SIZE="8", CONCURRENCY_LIMIT="1")
    daemon = Daemon(settings, backends={Backend.MOCK: backend})
    t0 = trio.current_time()
    async with running(daemon):
        await wait_until(all_done(sandbox.state, 150))
    elapsed = trio.current_time() - t0
    st = sandbox.state
    assert st.by_state() == {"succeeded": 150}
    assert elapsed > 4  # the run outlived several tokens
    # one token request per lifetime (2 s, renewed at 1.8 s), however many requests were waiting
    assert 2 <= st.token_requests <= elapsed / 1.8 + 2
    unauthorized = sum(n for (route, status), n in st.requests.items() if status == 401)
    assert unauthorized <= st.token_requests * 8  # at most the requests in flight at an expiry


async def test_revoked_token_one_fetch_however_many_requests_got_401(sandbox, tmp_path):
    sandbox.state.seed(400)
    backend = CountingBackend(delay=0.05)
    settings = make_settings(sandbox, tmp_path, MAX_BATCH_SIZE="16", API_CONCURRENCY="8")
    daemon = Daemon(settings, backends={Backend.MOCK: backend})
    async with running(daemon):
        await wait_until(lambda: sandbox.state.by_state().get("succeeded", 0) >= 50)
        before = sandbox.state.token_requests
        sandbox.state.revoke_all()
        await wait_until(lambda: any(s == 401 for (_, s) in sandbox.state.requests))
        await wait_until(all_done(sandbox.state, 400))
    st = sandbox.state
    assert st.by_state() == {"succeeded": 400}
    assert st.token_requests == before + 1
