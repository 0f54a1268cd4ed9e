"""The rate limiter with its SQLite store: durable, never silently reset, fails closed."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
import trio

from processor.effects.limiter import SqliteLimiter
from processor.effects.metrics import Metrics
from processor.effects.store import RateLimitStore, StoreError
from processor.pure import ratelimit as rl

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=ZoneInfo("UTC")).timestamp()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def limiter(path, clock, limits=None, strategy=rl.Strategy.ROLLING, tz="UTC", metrics=None):
    return SqliteLimiter(RateLimitStore(str(path)), limits or {rl.Period.MINUTE: 20, rl.Period.DAY: 100},
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
    await a.admit(20)
    await a.refund(T0, 5)
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
    assert sqlite3.connect(p).execute("PRAGMA user_version").fetchone()[0] == 1




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
    with pytest.raises(StoreError, match="disk full"):
        await a.admit(5)
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
    daemon = Daemon(settings, backends={Backend.MOCK: CountingBackend()}, handle_signals=False)
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
