"""The rate limiter with its SQLite store: durable, never silently reset, fails closed."""

from __future__ import annotations

import shutil
import sqlite3
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import trio

from processor.effects.limiter import LimiterError, RateLimitStore, SqliteLimiter
from processor.effects.metrics import Metrics
from processor.effects.store import StoreError
from processor.pure import ratelimit as rl
from processor.pure.faults import Fault

FIXTURES = Path(__file__).parent / "fixtures"

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=ZoneInfo("UTC")).timestamp()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def limiter(path, clock, limits=None, strategy=rl.Strategy.ROLLING, tz="UTC", metrics=None):
    return SqliteLimiter(str(path), limits or {rl.Period.MINUTE: 20, rl.Period.DAY: 100},
                         strategy=strategy, tz_name=tz, metrics=metrics, clock=clock)


async def test_counts_survive_a_restart(tmp_path):
    clock = Clock(T0)
    a = limiter(tmp_path / "rl.db", clock)
    d = await a.admit(15)
    assert d.admitted == 15
    clock.t += 10
    b = limiter(tmp_path / "rl.db", clock)  # a new process, same file
    d = await b.admit(15)
    assert d.admitted == 5 and d.retry_at == pytest.approx(T0 + 62)
    clock.t = T0 + 62
    assert (await b.admit(30)).admitted == 15  # the 15 from T0 expired; the 5 from T0+10 still count


async def test_refund_is_persisted(tmp_path):
    clock = Clock(T0)
    a = limiter(tmp_path / "rl.db", clock)
    d = await a.admit(20)
    await a.refund(d.reservations[:5])
    b = limiter(tmp_path / "rl.db", clock)
    assert (await b.admit(10)).admitted == 5


async def test_changing_a_limit_between_runs_applies_to_counts_already_used(tmp_path):
    clock = Clock(T0)
    await limiter(tmp_path / "rl.db", clock).admit(15)
    b = limiter(tmp_path / "rl.db", clock, {rl.Period.MINUTE: 10})
    assert (await b.admit(5)).admitted == 0
    assert b.usage()[0].used == 15 and b.usage()[0].remaining == 0


async def test_switching_strategy_keeps_the_counts(tmp_path):
    clock = Clock(T0 + 30)
    await limiter(tmp_path / "rl.db", clock).admit(20)
    b = limiter(tmp_path / "rl.db", clock, strategy=rl.Strategy.FIXED)
    assert (await b.admit(1)).admitted == 0


def test_a_corrupt_store_is_a_clear_error_never_a_reset(tmp_path):
    p = tmp_path / "rl.db"
    p.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError) as info:
        RateLimitStore(str(p))
    assert str(p) in str(info.value)
    with pytest.raises(LimiterError) as err:  # the limiter raises its own error, never the store's
        limiter(p, Clock(T0))
    assert err.value.kind is Fault.MALFORMED and str(p) in str(err.value)


def test_a_store_from_a_newer_release_is_refused(tmp_path):
    p = tmp_path / "rl.db"
    RateLimitStore(str(p)).db.close()
    con = sqlite3.connect(p)
    con.execute("PRAGMA user_version=99")
    con.close()
    with pytest.raises(StoreError, match="newer"):
        RateLimitStore(str(p))


def test_schema_is_versioned(tmp_path):
    p = tmp_path / "rl.db"
    RateLimitStore(str(p)).db.close()
    assert sqlite3.connect(p).execute("PRAGMA user_version").fetchone()[0] == 2




async def test_a_write_failure_admits_nothing_and_marks_the_store_unhealthy(tmp_path):
    clock = Clock(T0)
    metrics = Metrics()
    a = limiter(tmp_path / "rl.db", clock, metrics=metrics)
    await a.admit(1)
    # make the table unwritable underneath the limiter: a trigger that aborts every write
    con = sqlite3.connect(tmp_path / "rl.db")
    con.execute("CREATE TRIGGER deny BEFORE INSERT ON counters BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    con.execute("CREATE TRIGGER deny2 BEFORE UPDATE ON counters BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    con.commit()
    con.close()
    with pytest.raises(LimiterError, match="disk full") as info:
        await a.admit(5)
    assert info.value.kind is Fault.SERVER
    ok, err = a.healthy
    assert not ok and "disk full" in err
    assert a.usage()[0].used == 1  # nothing went through uncounted
    assert metrics.registry.get_sample_value("rate_limit_current_usage", {"period": "minute"}) == 1


async def test_daemon_stops_claiming_and_is_not_ready_when_the_store_cannot_be_written(sandbox, tmp_path):
    from processor.daemon import Daemon
    from processor.pure.tasks import Backend
    from tests.conftest import CountingBackend, make_settings, running, wait_until

    sandbox.state.seed(5)
    settings = make_settings(sandbox, tmp_path, RATE_LIMIT_ENABLED="true", RATE_LIMIT_PER_DAY="1000")
    daemon = Daemon(settings, backends={Backend.MOCK: CountingBackend()})
    async with running(daemon):
        await wait_until(lambda: sandbox.state.by_state().get("succeeded", 0) == 5)
        con = sqlite3.connect(settings.rate_limit_storage_path)
        con.execute("CREATE TRIGGER deny BEFORE UPDATE ON counters BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        con.execute("CREATE TRIGGER deny2 BEFORE INSERT ON counters BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        con.commit()
        con.close()
        sandbox.state.seed(5)
        await wait_until(lambda: any("state store not writable" in r for r in daemon.not_ready_reasons()))
        await trio.sleep(1.0)
        assert sandbox.state.by_state() == {"succeeded": 5, "pending": 5}  # nothing went through uncounted
        assert any("disk is full" in r for r in daemon.not_ready_reasons())


# --- issue 11 regressions -------------------------------------------------------------------

EDGE = datetime(2026, 5, 1, 12, 1, 0, tzinfo=ZoneInfo("UTC")).timestamp()  # a minute edge


def counters(path) -> dict[tuple[str, int], int]:
    con = sqlite3.connect(path)
    try:
        return {(p, b): u for p, b, u in con.execute("SELECT period, bucket, units FROM counters WHERE metric = 'tasks'")}
    finally:
        con.close()


async def test_a_refund_goes_back_to_the_period_it_was_charged_to(tmp_path):
    """The clock passes a fixed-window edge between the admission and the refund: the refund
    still lands in the period charged, never in the next one (15 in a minute at 10 before)."""
    clock = Clock(EDGE - 0.01)
    a = limiter(tmp_path / "rl.db", clock, {rl.Period.MINUTE: 10}, strategy=rl.Strategy.FIXED)
    first = await a.admit(10)  # charged to 12:00
    clock.t = EDGE + 0.01  # e.g. while the store wrote
    assert [r.at for r in first.reservations] == [EDGE - 0.01] * 10
    assert (await a.admit(10)).admitted == 10  # 12:01 is full
    await a.refund(first.reservations[:5])  # five claims of the first group failed
    assert (await a.admit(1)).admitted == 0
    assert counters(tmp_path / "rl.db")[("minute", int(EDGE))] == 10  # 12:00 is over: nothing to give back there
    b = limiter(tmp_path / "rl.db", clock, {rl.Period.MINUTE: 10}, strategy=rl.Strategy.FIXED)
    assert (await b.admit(1)).admitted == 0  # and so after a restart


@pytest.mark.parametrize("restart", [False, True])
async def test_a_clock_stepping_back_across_a_period_edge_reopens_nothing(tmp_path, restart):
    """10/min, fixed windows: 10 at 12:00:59.5, 10 at 12:01:00.2, then the clock steps back
    to 12:00:59.6. The old period was used already: nothing more (30 in 1.4 s before)."""
    clock = Clock(EDGE - 0.5)
    a = limiter(tmp_path / "rl.db", clock, {rl.Period.MINUTE: 10}, strategy=rl.Strategy.FIXED)
    assert (await a.admit(10)).admitted == 10
    clock.t = EDGE + 0.2
    assert (await a.admit(10)).admitted == 10
    clock.t = EDGE - 0.4  # NTP steps the clock back
    if restart:
        a = limiter(tmp_path / "rl.db", clock, {rl.Period.MINUTE: 10}, strategy=rl.Strategy.FIXED)
    d = await a.admit(10)
    assert d.admitted == 0
    assert d.retry_at == EDGE + 60  # the end of the period the high-water mark is in
    clock.t = EDGE + 60
    assert (await a.admit(10)).admitted == 10


async def test_a_store_written_by_a6a26dd_loads_with_its_counts(tmp_path):
    """tests/fixtures/rate_limits_a6a26dd_*.db were written by a6a26dd's limiter (see
    tests/fixtures/README.md): 7 units at T, 5 at T+10 s, 2 of the first refunded."""
    t = 1_777_636_800.0  # 2026-05-01T12:00:00Z
    for strategy in rl.Strategy:
        p = tmp_path / f"{strategy.value}.db"
        shutil.copy(FIXTURES / f"rate_limits_a6a26dd_{strategy.value}.db", p)
        lim = SqliteLimiter(str(p), {rl.Period.MINUTE: 20, rl.Period.DAY: 100}, strategy=strategy, tz_name="Europe/Berlin",
                            metrics=None, clock=Clock(t + 20))
        assert [(u.period, u.used) for u in lim.usage()] == [(rl.Period.MINUTE, 10), (rl.Period.DAY, 10)]
        assert (await lim.admit(15)).admitted == 10
        con = sqlite3.connect(p)
        assert con.execute("PRAGMA user_version").fetchone()[0] == 2  # migrated: a metric per counter
        assert {m for (m,) in con.execute("SELECT metric FROM counters")} == {"tasks"}
        con.close()


def deny_writes(path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TRIGGER deny BEFORE UPDATE ON counters BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    con.execute("CREATE TRIGGER deny2 BEFORE INSERT ON counters BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    con.commit()
    con.close()


def allow_writes(path) -> None:
    con = sqlite3.connect(path)
    con.execute("DROP TRIGGER deny")
    con.execute("DROP TRIGGER deny2")
    con.commit()
    con.close()


async def test_a_failing_openai_limiter_store_never_ends_the_daemon(sandbox, tmp_path):
    """The OpenAI limiter's store fails like the global one's can: nothing is claimed while
    it fails, the daemon keeps running, and work resumes when the store does."""
    from processor.daemon import Daemon
    from processor.pure.tasks import Backend
    from tests.conftest import CountingBackend, make_settings, wait_until

    sandbox.state.seed(3, model="text-embedding-3-small")
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="openai", OPENAI_API_KEY="sk-test-0000000000000000",
                             RATE_LIMIT_ENABLED="true", OPENAI_RATE_LIMIT_PER_DAY="1000")
    openai_db = settings.rate_limit_storage_path.replace(".db", "") + "_openai.db"
    daemon = Daemon(settings, backends={Backend.OPENAI: CountingBackend()})
    ended: list[object] = []

    async def run() -> None:
        try:
            ended.append(await daemon.run())
        except BaseException as exc:
            ended.append(exc)
            raise

    async with trio.open_nursery() as n:
        n.start_soon(run)
        with trio.fail_after(120):
            await daemon.started.wait()
        await wait_until(lambda: sandbox.state.by_state().get("succeeded", 0) == 3)
        deny_writes(openai_db)
        sandbox.state.seed(3, model="text-embedding-3-small")
        await wait_until(lambda: not daemon.pipeline.admission.openai_limiter.healthy[0] or bool(ended))  # it tried, and failed
        await trio.sleep(0.5)
        assert not ended, ended  # the daemon is still running
        assert sandbox.state.by_state() == {"succeeded": 3, "pending": 3}  # nothing went through uncounted
        allow_writes(openai_db)
        await wait_until(lambda: sandbox.state.by_state().get("succeeded", 0) == 6)
        daemon.stop()
