"""Faults injected into the sandbox: the daemon keeps working, loses nothing, goes easy on
what is failing, and shuts down cleanly on signals."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

import httpx
import structlog
import trio

from processor.daemon import Daemon
from processor.effects.backends.mock import mock_vector
from processor.pure import breaker as br
from processor.pure.tasks import Backend
from processor.sandbox import Fault
from tests.conftest import CountingBackend, all_done, make_settings, running, sandbox_env, wait_until

EPOCH = 1_780_000_000.0


async def test_flaky_patches_every_task_succeeds_once(sandbox, tmp_path):
    """30 % of PATCHes answer 503, half of them after applying the change."""
    ids = sandbox.state.seed(200)
    sandbox.state.faults["patch"] = Fault(status=503, probability=0.3, apply=True)
    settings = make_settings(sandbox, tmp_path, MAX_BATCH_SIZE="16", RECLAIM_INTERVAL_SECONDS="1", RECLAIM_AFTER_SECONDS="1",
                             RETRY_MAX_DELAY_SECONDS="0.5", CIRCUIT_BREAKER_THRESHOLD="50")
    daemon = Daemon(settings, backends={Backend.MOCK: CountingBackend()})
    async with running(daemon):
        await trio.sleep(2)
        del sandbox.state.faults["patch"]  # "for a while"
        await wait_until(all_done(sandbox.state, 200))
    st = sandbox.state
    assert st.by_state() == {"succeeded": 200}
    assert st.stats()["tasks_with_conflicting_results"] == 0  # never two different results
    assert any(s == 503 for (_, s) in st.requests)
    for i in ids:
        assert st.tasks[i]["result"] == mock_vector(settings.default_model, st.tasks[i]["content"], 1024)


async def test_api_outage_backs_off_then_recovers(sandbox, tmp_path, mock_clock):
    mock_clock.rate = 10
    sandbox.state.clock = lambda: EPOCH + trio.current_time()
    sandbox.state.seed(50)
    settings = make_settings(sandbox, tmp_path, POLLING_INTERVAL_SECONDS="2", RETRY_MAX_DELAY_SECONDS="5")
    daemon = Daemon(settings, backends={Backend.MOCK: CountingBackend()}, clock=lambda: EPOCH + trio.current_time())
    async with running(daemon):
        await wait_until(all_done(sandbox.state, 50))
        outage_start = sandbox.state.clock()
        sandbox.state.faults["*"] = Fault(status=503)
        sandbox.state.seed(30)
        await trio.sleep(30)  # virtual seconds
        guard = daemon.pipeline.api.guard
        assert guard.state.state is not br.State.CLOSED
        bound = br.open_wait(guard.cfg, guard.state.reopens) + settings.polling_interval_seconds * 1.1 + 2
        outage_end = sandbox.state.clock()
        del sandbox.state.faults["*"]
        await wait_until(all_done(sandbox.state, 80), timeout=bound + 30)
        recovered = min(t for t, route, status in sandbox.state.request_log if t > outage_end and status == 200)
    during = [t for t, route, status in sandbox.state.request_log if outage_start <= t < outage_end]
    assert len(during) >= 3  # it did try
    # after the breaker opened (a few seconds in), at most about one request per second
    late = [t for t in during if t > outage_start + 10]
    assert len(late) <= (outage_end - outage_start - 10) * 1.0 + 2
    assert recovered - outage_end <= bound


async def test_invalid_client_is_named_not_ready_backs_off_and_recovers(sandbox, tmp_path, mock_clock):
    mock_clock.rate = 10
    sandbox.state.clock = lambda: EPOCH + trio.current_time()
    sandbox.state.seed(20)
    settings = make_settings(sandbox, tmp_path, RETRY_MAX_DELAY_SECONDS="5", POLLING_INTERVAL_SECONDS="2")
    good_secret = sandbox.state.client_secret
    sandbox.state.client_secret = "rotated-elsewhere"  # the daemon's secret no longer works
    daemon = Daemon(settings, backends={Backend.MOCK: CountingBackend()})
    with structlog.testing.capture_logs() as logs:
        async with running(daemon):
            await trio.sleep(30)  # virtual
            async with httpx.AsyncClient() as c:
                r = await c.get(f"{daemon.health_url}/ready")
            assert r.status_code == 503
            assert any("invalid_client" in reason for reason in r.json()["reasons"])
            assert 3 <= sandbox.state.token_requests <= 8  # 1, 2, 4, 8, 16 s apart: no hot loop
            sandbox.state.client_secret = good_secret
            await wait_until(all_done(sandbox.state, 20), timeout=200)
            async with httpx.AsyncClient() as c:
                assert (await c.get(f"{daemon.health_url}/ready")).status_code == 200
    failed = [e for e in logs if e["event"] == "token_request_failed"]
    assert failed and "OAUTH2_CLIENT_ID / OAUTH2_CLIENT_SECRET" in failed[0]["hint"]


# --- signals: the daemon as a real process ------------------------------------------------


def _spawn(env: dict[str, str]) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    log = open(os.path.join(env["STATE_DIR"] + ".log"), "ab")  # noqa: SIM115 - read by the test on failure
    return subprocess.Popen([sys.executable, "-m", "processor", "run"], env={**base, **env}, stdout=log, stderr=log)


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    with trio.move_on_after(timeout):
        while proc.poll() is None:
            await trio.sleep(0.05)
    return proc.poll()


def _outbox_rows(state_dir) -> int:
    if not (state_dir / "journal.db").exists():
        return 0
    con = sqlite3.connect(state_dir / "journal.db")
    try:
        return con.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    except sqlite3.OperationalError:  # the daemon is still creating its schema
        return 0
    finally:
        con.close()


async def test_sigterm_mid_batch_exits_0_and_leaves_nothing_in_progress(sandbox, tmp_path):
    sandbox.state.seed(60)
    env = sandbox_env(sandbox, tmp_path, MOCK_LATENCY_MS="1200", MAX_BATCH_SIZE="8", CONCURRENCY_LIMIT="2", SHUTDOWN_GRACE_SECONDS="6")
    proc = _spawn(env)
    await wait_until(lambda: sandbox.state.by_state().get("succeeded", 0) >= 8)
    await wait_until(lambda: sandbox.state.by_state().get("in_progress", 0) > 0)
    proc.send_signal(signal.SIGTERM)
    code = await _wait_exit(proc, 120)  # within the grace; the timeout only turns a hang into a failure
    assert code == 0
    states = sandbox.state.by_state()
    assert states.get("in_progress", 0) == 0
    assert states.get("succeeded", 0) + states.get("pending", 0) == 60
    assert _outbox_rows(tmp_path / "state") == 0, (tmp_path / "state.log").read_text()[-5000:]  # every result reported


async def test_sigterm_grace_expiry_releases_unfinished_claims(sandbox, tmp_path):
    sandbox.state.seed(20)
    env = sandbox_env(sandbox, tmp_path, MOCK_LATENCY_MS="300000", SHUTDOWN_GRACE_SECONDS="1")
    proc = _spawn(env)
    await wait_until(lambda: sandbox.state.by_state().get("in_progress", 0) == 20)
    t0 = trio.current_time()
    proc.send_signal(signal.SIGTERM)
    code = await _wait_exit(proc, 120)
    # the batch would take 300 s: ending well before it is the grace running out, however
    # busy the machine
    assert code == 0 and trio.current_time() - t0 < 100
    assert sandbox.state.by_state() == {"pending": 20}


async def test_second_signal_cuts_the_grace(sandbox, tmp_path):
    sandbox.state.seed(10)
    env = sandbox_env(sandbox, tmp_path, MOCK_LATENCY_MS="300000", SHUTDOWN_GRACE_SECONDS="200")
    proc = _spawn(env)
    await wait_until(lambda: sandbox.state.by_state().get("in_progress", 0) == 10)
    t0 = trio.current_time()
    proc.send_signal(signal.SIGTERM)
    await trio.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    code = await _wait_exit(proc, 120)
    # the grace (200 s) and the batch (300 s) are far off: ending before them is the cut
    assert code == 0 and trio.current_time() - t0 < 100
    assert sandbox.state.by_state() == {"pending": 10}


async def test_sigkill_then_restart_delivers_the_outbox_and_releases_the_rest(sandbox, tmp_path):
    sandbox.state.seed(40)
    # results cannot be reported: they pile up in the outbox
    sandbox.state.faults["patch"] = Fault(status=503, only_state="succeeded")
    env = sandbox_env(sandbox, tmp_path, MOCK_LATENCY_MS="200", MAX_BATCH_SIZE="8", CONCURRENCY_LIMIT="1", RETRY_MAX_DELAY_SECONDS="0.5")
    proc = _spawn(env)
    await wait_until(lambda: _outbox_rows(tmp_path / "state") >= 16)
    proc.kill()
    proc.wait()
    in_outbox = _outbox_rows(tmp_path / "state")
    assert in_outbox >= 16
    assert sandbox.state.by_state().get("in_progress", 0) > 0
    del sandbox.state.faults["patch"]
    proc = _spawn(env)
    try:
        await wait_until(all_done(sandbox.state, 40))
    finally:
        proc.send_signal(signal.SIGTERM)
        if await _wait_exit(proc, 60) is None:
            proc.kill()
    st = sandbox.state
    assert st.by_state() == {"succeeded": 40}
    assert st.stats()["tasks_with_conflicting_results"] == 0
    for t in st.tasks.values():  # the delivered vectors are the ones computed (deterministic mock)
        assert t["result"] == mock_vector("nomic-embed-text", t["content"], 1024)
    assert _outbox_rows(tmp_path / "state") == 0


async def test_claims_refused_by_the_api_back_off_instead_of_looping(sandbox, tmp_path):
    """403 on every claim (e.g. a token without the write scope): no hot loop, nothing lost."""
    sandbox.state.seed(5)
    sandbox.state.faults["patch"] = Fault(status=403, only_state="in_progress")
    settings = make_settings(sandbox, tmp_path, RETRY_MAX_DELAY_SECONDS="2")
    daemon = Daemon(settings, backends={Backend.MOCK: CountingBackend()})
    t0 = trio.current_time()

    def refused() -> int:
        return sum(n for (route, status), n in sandbox.state.requests.items() if route == "patch" and status == 403)

    async with running(daemon):
        await wait_until(lambda: refused() >= 5)  # every task tried
        await trio.sleep(3)
        # a few rounds with growing pauses (at most 2 s apart), not thousands: at most 20 a
        # second, however long this machine took to get here
        assert refused() <= 20 * (trio.current_time() - t0)
        del sandbox.state.faults["patch"]
        await wait_until(all_done(sandbox.state, 5))
    assert sandbox.state.by_state() == {"succeeded": 5}
