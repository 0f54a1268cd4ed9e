"""Admissions per second: the pure core alone, with the SQLite store, and with Redis.

    python bench/ratelimit.py [--n 20000]

Every tier on (minute ... month), rolling windows; each admission asks for one unit, as the
claim stage does per group (a group of up to MAX_BATCH_SIZE tasks is one admission). The
"budgets" rows add token tiers (minute ... month) and spend caps (day, month): each admission
is one priced task (a Demand) and is settled afterwards with its real usage, as a call is.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from zoneinfo import ZoneInfo

import coredis
import trio

from processor.effects.limiter import SqliteLimiter
from processor.effects.redis_state import RedisLimiter, RedisShared
from processor.pure import ratelimit as rl
from processor.pure.budget import DEFAULT_PRICES

LIMITS = {rl.Period.MINUTE: 10**9, rl.Period.HOUR: 10**9, rl.Period.DAY: 10**9, rl.Period.WEEK: 10**9, rl.Period.MONTH: 10**9}
BUDGETS = {"tokens": dict(LIMITS), "spend": {rl.Period.DAY: 10**15, rl.Period.MONTH: 10**15}, "prices": dict(DEFAULT_PRICES)}
DEMAND = [rl.Demand(400, 1_000, "o3")]


def pure_budgets(n: int) -> float:
    state = rl.new_state(LIMITS, tz=ZoneInfo("UTC"), **BUDGETS)
    now = 1_790_000_000.0
    t0 = time.perf_counter()
    for i in range(n):
        state, d = rl.admit(state, now + i * 0.01, DEMAND)
        state, _, _ = rl.settle(state, [r for r in d.reservations if r], 300, 700)
    return n / (time.perf_counter() - t0)


async def sqlite_budgets(n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        clock = iter(1_790_000_000.0 + i * 0.005 for i in range(3 * n + 10))
        lim = SqliteLimiter(f"{tmp}/rl.db", LIMITS, strategy=rl.Strategy.ROLLING, tz_name="UTC", metrics=None,
                            clock=lambda: next(clock), **BUDGETS)
        t0 = time.perf_counter()
        for _ in range(n):
            d = await lim.admit(DEMAND)
            await lim.settle([r for r in d.reservations if r], tokens_in=300, tokens_out=700)
        return n / (time.perf_counter() - t0)


async def redis_budgets(n: int) -> float | None:
    client = coredis.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    async with client:
        lim = RedisLimiter(RedisShared(client, prefix=prefix), LIMITS, strategy=rl.Strategy.ROLLING, tz_name="UTC", metrics=None, **BUDGETS)
        try:
            await lim.admit(DEMAND)
        except Exception as exc:  # noqa: BLE001
            print(f"redis: unavailable ({exc})")
            return None
        t0 = time.perf_counter()
        for _ in range(n):
            d = await lim.admit(DEMAND)
            await lim.settle([r for r in d.reservations if r], tokens_in=300, tokens_out=700)
        rate = n / (time.perf_counter() - t0)
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(keys)
        return rate


def pure(n: int) -> float:
    state = rl.new_state(LIMITS, tz=ZoneInfo("UTC"))
    now = 1_790_000_000.0
    t0 = time.perf_counter()
    for i in range(n):
        state, _ = rl.admit(state, now + i * 0.01, 1)
    return n / (time.perf_counter() - t0)


async def sqlite(n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        clock = iter(1_790_000_000.0 + i * 0.01 for i in range(n + 10))
        lim = SqliteLimiter(f"{tmp}/rl.db", LIMITS, strategy=rl.Strategy.ROLLING, tz_name="UTC", metrics=None,
                            clock=lambda: next(clock))
        t0 = time.perf_counter()
        for _ in range(n):
            await lim.admit(1)
        return n / (time.perf_counter() - t0)


async def redis(n: int) -> float | None:
    client = coredis.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    async with client:
        shared = RedisShared(client, prefix=prefix)
        lim = RedisLimiter(shared, LIMITS, strategy=rl.Strategy.ROLLING, tz_name="UTC", metrics=None)
        try:
            await lim.admit(1)
        except Exception as exc:  # noqa: BLE001
            print(f"redis: unavailable ({exc})")
            return None
        t0 = time.perf_counter()
        for _ in range(n):
            await lim.admit(1)
        rate = n / (time.perf_counter() - t0)
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(keys)
        return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    n = ap.parse_args().n
    p = pure(n)
    s = trio.run(sqlite, n // 4)
    r = trio.run(redis, n // 4)
    print(f"pure core     : {p:10,.0f} admissions/s")
    print(f"SQLite store  : {s:10,.0f} admissions/s  (one transaction each, synchronous=FULL, through a worker thread)")
    if r is not None:
        print(f"Redis script  : {r:10,.0f} admissions/s  (TIME + one script per admission)")
    pb = pure_budgets(n // 4)
    sb = trio.run(sqlite_budgets, n // 8)
    rb = trio.run(redis_budgets, n // 8)
    print(f"budgets, pure : {pb:10,.0f} admissions+settlements/s  ({pb / p:.2f} of the task-count-only pure core)")
    print(f"budgets, SQLite: {sb:9,.0f} admissions+settlements/s  ({sb / s:.2f} of task counts only: two transactions each)")
    if rb is not None and r is not None:
        print(f"budgets, Redis: {rb:10,.0f} admissions+settlements/s  ({rb / r:.2f} of task counts only: three round trips each)")
    print("a claim group of up to MAX_BATCH_SIZE (64) tasks is one admission")


if __name__ == "__main__":
    main()
