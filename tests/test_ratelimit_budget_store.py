"""Token and spend budgets through the real stores: SQLite files and the Redis script.

A spend cap and a token tier hold exactly across restarts: reserve by an upper-bound
estimate, settle with the real usage, restart (a new limiter on the same file or keys), and
the recorded totals are exactly what was spent and never above the caps.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from zoneinfo import ZoneInfo

import coredis
import pytest
import trio

from processor.effects.limiter import LimiterError, SqliteLimiter
from processor.effects.redis_state import RedisLimiter, RedisShared
from processor.pure import ratelimit as rl
from processor.pure.budget import DEFAULT_PRICES, cost, parse_money
from tests.test_redis import REDIS, cleanup, own_redis  # noqa: F401, F811 - a fixture

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=ZoneInfo("UTC")).timestamp()
PRICES = {"o3": DEFAULT_PRICES["o3"], "text-embedding-3-small": DEFAULT_PRICES["text-embedding-3-small"]}
# (spend cap, token cap, calls that fit): 5 cents bind at 5 calls (each reserves 0.014 USD,
# costs 0.0078); 6,000 tokens bind at 3 (each reserves 2,500 tokens, uses 1,200)
CAPS = [(parse_money("0.05"), 20_000, 5), (parse_money("1.00"), 6_000, 3)]


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def budgets(spend_cap: int, token_cap: int) -> dict:
    return {"tokens": {rl.Period.DAY: token_cap}, "spend": {rl.Period.DAY: spend_cap}, "prices": PRICES}


class RedisAt:
    """A RedisLimiter whose clock is the test's (admit_at), with the Limiter's admit()."""

    def __init__(self, lim: RedisLimiter, clock: Clock) -> None:
        self.lim, self.clock = lim, clock

    async def admit(self, demands):
        return await self.lim.admit_at(demands, self.clock())

    async def settle(self, reservations, **usage):
        return await self.lim.settle(reservations, **usage)

    async def refund(self, reservations):
        await self.lim.refund(reservations)

    def usage(self):
        return rl.usage(self.lim.state, self.clock())


async def run_budget_day(make, clock, spend_cap, token_cap, expected_calls):
    """o3 calls of 1,000-byte prompts with max_completion_tokens=1,500 (the reservation), that
    really use 300 input and 900 output tokens; restarts every few calls."""
    real_in, real_out = 300, 900
    lim = await make()
    spent = tokens = calls = 0
    for step in range(40):
        if step % 4 == 3:
            lim = await make()  # a restart: everything from the store
        d = await lim.admit([rl.Demand(1_000, 1_500, "o3")])
        if not d.admitted:
            assert d.refusals == (rl.Refusal.LIMIT,) and d.retry_at is not None
            break
        (r,) = d.reservations
        assert r.spend == cost(PRICES["o3"], 1_000, 1_500)
        settled = await lim.settle([r], tokens_in=real_in, tokens_out=real_out)
        assert settled[0].spend == cost(PRICES["o3"], real_in, real_out)
        spent += cost(PRICES["o3"], real_in, real_out)
        tokens += real_in + real_out
        calls += 1
        clock.t += 30
    lim = await make()
    views = {(u.metric, u.period): u for u in lim.usage()}
    assert views[(rl.Metric.SPEND, rl.Period.DAY)].used == spent <= spend_cap
    assert views[(rl.Metric.TOKENS, rl.Period.DAY)].used == tokens <= token_cap
    assert views[(rl.Metric.TASKS, rl.Period.DAY)].used == calls == expected_calls
    # the cap is used up to what one more reservation needs: the next one does not fit
    assert spend_cap - spent < cost(PRICES["o3"], 1_000, 1_500) or token_cap - tokens < 2_500
    # a free task (local model) still fits; an unpriced model is refused by name; the next o3 waits
    d = await lim.admit([rl.Demand(100, 0, None), rl.Demand(100, 0, "gpt-unknown"), rl.Demand(1_000, 1_500, "o3")])
    assert d.refusals == (None, rl.Refusal.NO_PRICE, rl.Refusal.LIMIT) and d.unpriced == ("gpt-unknown",)
    assert d.retry_at == datetime(2026, 5, 2, tzinfo=ZoneInfo("UTC")).timestamp()  # fixed day: the next midnight


@pytest.mark.parametrize(("spend_cap", "token_cap", "calls"), CAPS)
async def test_a_spend_cap_and_a_token_tier_hold_exactly_across_restarts_sqlite(tmp_path, spend_cap, token_cap, calls):
    clock = Clock(T0)
    path = str(tmp_path / "rl.db")

    async def make():
        return SqliteLimiter(path, {rl.Period.DAY: 1000}, strategy=rl.Strategy.FIXED, tz_name="UTC", metrics=None,
                             clock=clock, **budgets(spend_cap, token_cap))

    await run_budget_day(make, clock, spend_cap, token_cap, calls)


@pytest.mark.parametrize(("spend_cap", "token_cap", "calls"), CAPS)
async def test_a_spend_cap_and_a_token_tier_hold_exactly_across_restarts_redis(spend_cap, token_cap, calls):
    client = coredis.Redis.from_url(REDIS, decode_responses=True)
    prefix = f"bud-{uuid.uuid4().hex[:8]}"
    clock = Clock(T0)
    async with client:
        shared = RedisShared(client, prefix=prefix)

        async def make():
            lim = RedisLimiter(shared, {rl.Period.DAY: 1000}, strategy=rl.Strategy.FIXED, tz_name="UTC", metrics=None,
                               **budgets(spend_cap, token_cap))
            await lim.refresh()
            return RedisAt(lim, clock)

        try:
            await run_budget_day(make, clock, spend_cap, token_cap, calls)
        finally:
            await cleanup(REDIS, prefix)


async def test_a_settlement_the_store_cannot_take_counts_at_once_and_is_written_later(tmp_path):
    """Real usage above the estimate while the disk refuses writes: the truth counts in
    memory at once (nothing more is admitted past it), and is on disk after the next write."""
    from tests.test_ratelimit_store import allow_writes, deny_writes

    clock = Clock(T0)
    path = str(tmp_path / "rl.db")

    def make():
        return SqliteLimiter(path, {}, strategy=rl.Strategy.ROLLING, tz_name="UTC", metrics=None, clock=clock,
                             tokens={rl.Period.DAY: 10_000}, prices=PRICES)

    lim = make()
    (r,) = (await lim.admit([rl.Demand(1_000, 0, "text-embedding-3-small")])).reservations
    deny_writes(path)
    await lim.settle([r], tokens_in=4_000, tokens_out=0)  # 3,000 more than reserved; does not raise
    assert lim.usage()[0].used == 4_000 and not lim.healthy[0]
    with pytest.raises(LimiterError):
        await lim.admit([rl.Demand(100, 0, None)])
    allow_writes(path)
    d = await lim.admit([rl.Demand(6_000, 0, None), rl.Demand(1, 0, None)])
    assert d.refusals == (None, rl.Refusal.LIMIT)  # 4,000 + 6,000 = the whole day
    assert make().usage()[0].used == 10_000  # on disk: the settlement and the admission


async def test_a_settlement_redis_cannot_take_is_written_before_the_next_admission(own_redis):  # noqa: F811
    port, holder, start = own_redis
    client = coredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", decode_responses=True, connect_timeout=10, stream_timeout=10)
    async def answering() -> None:  # a redis-server just started may not listen yet
        with trio.fail_after(120):
            while True:
                try:
                    await client.ping()
                    return
                except Exception:  # noqa: BLE001 - still starting
                    await trio.sleep(0.1)

    async with client:
        lim = RedisLimiter(RedisShared(client, prefix="defer"), {}, strategy=rl.Strategy.ROLLING, tz_name="UTC", metrics=None,
                           tokens={rl.Period.DAY: 10_000}, prices=PRICES)
        await answering()
        (r,) = (await lim.admit_at([rl.Demand(1_000, 0, "text-embedding-3-small")], T0)).reservations
        holder["proc"].terminate()
        holder["proc"].wait()
        await lim.settle([r], tokens_in=4_000, tokens_out=0)  # does not raise
        assert rl.usage(lim.state, T0)[0].used == 4_000
        with pytest.raises(LimiterError):
            await lim.admit_at([rl.Demand(100, 0, None)], T0 + 1)
        holder["proc"] = start()  # an empty Redis (no persistence in this test server)
        await answering()
        d = await lim.admit_at([rl.Demand(1_000, 0, None)], T0 + 2)
        assert d.admitted == 1
        # the restarted Redis lost the first reservation (1,000); the deferred settlement (+3,000)
        # went in before this admission (+1,000)
        assert rl.usage(lim.state, T0 + 2)[0].used == 3_000 + 1_000


async def test_limits_command_and_gauges_show_token_and_spend_tiers(tmp_path):
    import os
    import subprocess
    import sys

    from processor.effects.metrics import Metrics

    metrics = Metrics()
    lim = SqliteLimiter(str(tmp_path / "rate_limits.db"), {rl.Period.DAY: 500}, strategy=rl.Strategy.ROLLING, tz_name="UTC",
                        metrics=metrics, tokens={rl.Period.DAY: 20_000}, spend={rl.Period.DAY: parse_money("5")}, prices=PRICES)
    (r,) = (await lim.admit([rl.Demand(1_000, 1_500, "o3")])).reservations
    await lim.settle([r], tokens_in=300, tokens_out=900)
    assert metrics.registry.get_sample_value("rate_limit_budget_used", {"metric": "spend", "period": "day"}) == pytest.approx(0.0078)
    assert metrics.registry.get_sample_value("rate_limit_budget_remaining", {"metric": "tokens", "period": "day"}) == 18_800
    from processor.effects.limiter import tier_views

    views = tier_views(lim.usage())
    assert views[0]["period"] == "day" and "metric" not in views[0]
    assert {(v.get("metric"), v["used"], v["limit"]) for v in views[1:]} == {("tokens", 1_200, 20_000), ("spend", "0.0078", "5")}
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    env.update({"API_BASE_URL": "http://127.0.0.1:9", "OAUTH2_TOKEN_URL": "http://127.0.0.1:9/t", "OAUTH2_CLIENT_ID": "a",
                "OAUTH2_CLIENT_SECRET": "b", "PROCESSING_MODE": "mock", "STATE_DIR": str(tmp_path), "RATE_LIMIT_PER_DAY": "500",
                "RATE_LIMIT_TOKENS_PER_DAY": "20000", "SPEND_LIMIT_PER_DAY": "5"})
    out = subprocess.run([sys.executable, "-m", "processor", "limits"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[1:4] for line in out.stdout.splitlines()[2:]}
    assert rows == {"day": ["1", "500", "499"], "tokens/day": ["1200", "20000", "18800"], "spend/day": ["0.0078", "5", "4.9922"]}
