"""A spend cap and a token tier hold exactly at daemon level, across a restart, with the
state in a real SQLite file and in the real local Redis (127.0.0.1:6379, keys under a
prefix of this test's own, deleted afterwards).

The real daemon runs against the sandbox task API with the mock backend, which reports a
deterministic usage: `bytes // 3 + 1` tokens per text. Every text has L = 400 bytes, so a
task reserves E = 400 tokens (its UTF-8 bytes, an upper bound) and uses u = 134. The daemon
is stopped part-way and a new one continues on the same state.

"Exactly" means, for the binding tier with cap C, per-task reservation R and per-task real
amount a (tokens: R = 400, a = 134; spend: their prices):
  * the recorded total is the real usage of the reported tasks to the unit: used == k * a
    for the k tasks reported `succeeded` (no estimate left over, nothing lost in the restart);
  * it never goes past the cap: used <= C;
  * the cap is reached: C - used < R, i.e. no further task could have been admitted, so the
    total falls short of the cap by less than one task's reservation. With equal tasks that
    fixes k = floor((C - R) / a) + 1.
Tasks the cap holds back stay `pending` (none is failed), and so do the tasks whose model has
no price while the spend cap is on; /health names that model.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import trio

from processor import wiring
from processor.daemon import Daemon
from processor.effects.limiter import build_limiter
from processor.effects.redis_state import RedisShared, make_client
from processor.effects.redis_state import build_limiter as build_redis_limiter
from processor.pure import ratelimit as rl
from processor.pure.budget import DEFAULT_PRICES, cost, format_money
from tests.conftest import make_settings, running, wait_until
from tests.test_redis import REDIS, cleanup

MODEL = "text-embedding-3-small"
L = 400  # bytes per text
R_TOKENS = L  # reserved per task
A_TOKENS = L // 3 + 1  # used per task (the mock's count)
R_SPEND = cost(DEFAULT_PRICES[MODEL], R_TOKENS, 0)  # nano-units
A_SPEND = cost(DEFAULT_PRICES[MODEL], A_TOKENS, 0)
CASES = {
    # binding tier: (RATE_LIMIT_TOKENS_PER_DAY, SPEND_LIMIT_PER_DAY, cap, reservation, real amount)
    "tokens": ("4220", "1", 4220, R_TOKENS, A_TOKENS),
    "spend": ("1000000", "0.0001", 100_000, R_SPEND, A_SPEND),
}
UNPRICED = "no-price-embed"


def expected_tasks(cap: int, reserved: int, real: int) -> int:
    return (cap - reserved) // real + 1


def settings_for(sandbox: Any, tmp_path: Any, case: str, **extra: str) -> Any:
    tokens, spend, *_ = CASES[case]
    return make_settings(
        sandbox, tmp_path, RATE_LIMIT_ENABLED="true", RATE_LIMIT_TOKENS_PER_DAY=tokens, SPEND_LIMIT_PER_DAY=spend,
        MOCK_LATENCY_MS="150", MAX_BATCH_SIZE="2", CONCURRENCY_LIMIT="1", INTAKE_CAPACITY="8", EMBEDDING_DIMENSIONS="8",
        **extra,
    )


def sqlite_daemon(settings: Any) -> AbstractAsyncContextManager[Daemon]:
    return running(Daemon(settings))


@asynccontextmanager
async def redis_daemon(settings: Any) -> AsyncIterator[Daemon]:
    """What `processor.wiring` builds for STATE_BACKEND=redis, without signal handling."""
    async with wiring.redis_daemon(settings) as daemon, running(daemon):
        yield daemon


async def stored_usage(settings: Any, backend: str) -> dict[tuple[str, str], int]:
    """What the store holds, read by a fresh limiter (not the daemon's memory)."""
    if backend == "sqlite":
        lim: Any = build_limiter(wiring.limiter_configs(settings)[0], settings.rate_limit_storage_path, metrics=None)
        usage = lim.usage()
    else:
        client = make_client(settings.redis_url)
        async with client:
            lim = build_redis_limiter(wiring.limiter_configs(settings)[0], RedisShared(client, prefix=settings.redis_key_prefix), metrics=None)
            await lim.refresh()
            usage = lim.usage()
    return {(u.metric.value, u.period.value): u.used for u in usage}


def succeeded(sandbox: Any) -> int:
    return int(sandbox.state.by_state().get("succeeded", 0))


def claims(sandbox: Any) -> int:
    return sum(1 for p in sandbox.state.patches if p.state == "in_progress")


async def quiet(daemon: Daemon, sandbox: Any, *, want: int, timeout: float = 120.0) -> None:
    """Until `want` tasks are reported and then no task is claimed nor in progress for 2 s
    (ten polls, each refused by the cap: nothing more is admitted)."""
    try:
        await wait_until(lambda: succeeded(sandbox) >= want, timeout=timeout)
    except trio.TooSlowError:
        raise AssertionError(f"{sandbox.state.by_state()} {daemon.pipeline.admission.limiter.usage() if daemon.pipeline else None}") from None
    with trio.fail_after(timeout):
        seen, calm_since = claims(sandbox), trio.current_time()
        while trio.current_time() - calm_since < 2.0:
            await trio.sleep(0.05)
            if claims(sandbox) != seen or sandbox.state.by_state().get("in_progress", 0):
                seen, calm_since = claims(sandbox), trio.current_time()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_spend_cap_and_a_token_tier_hold_exactly_across_a_restart(sandbox, tmp_path, backend, case):
    prefix = f"test-budget-{uuid.uuid4().hex[:8]}"
    extra = {"STATE_BACKEND": "redis", "REDIS_URL": REDIS, "REDIS_KEY_PREFIX": prefix} if backend == "redis" else {}
    settings = settings_for(sandbox, tmp_path, case, **extra)
    _, _, cap, reserved, real = CASES[case]
    k = expected_tasks(cap, reserved, real)
    unpriced = sandbox.state.seed(3, text_size=L, model=UNPRICED, prefix="old")  # oldest first: never block the others
    sandbox.state.seed(k + 20, text_size=L, model=MODEL)
    run = sqlite_daemon if backend == "sqlite" else redis_daemon
    try:
        async with run(settings):
            await wait_until(lambda: succeeded(sandbox) >= k // 3, timeout=120)
        assert 0 < succeeded(sandbox) < k  # stopped part-way: the rest is the second run's
        assert sandbox.state.by_state().get("in_progress", 0) == 0
        async with run(settings) as second:
            await quiet(second, sandbox, want=k)
            health = second.health()
        states = sandbox.state.by_state()
        stored = await stored_usage(settings, backend)
    finally:
        if backend == "redis":
            await cleanup(REDIS, prefix)

    # the cap's exact total: the k tasks' real usage, never above the cap, short of it by less than one reservation
    assert states == {"succeeded": k, "pending": 20 + 3}, states  # held back, never failed
    assert all(sandbox.state.tasks[i]["state"] == "pending" for i in unpriced)
    tokens, spend = stored[("tokens", "day")], stored[("spend", "day")]
    assert tokens == k * A_TOKENS and spend == k * A_SPEND  # settled to the unit, across the restart
    used = tokens if case == "tokens" else spend
    assert used <= cap and cap - used < reserved

    # what /health showed: the tiers with their metric, and the model without a price
    views = {(v.get("metric", "tasks"), v["period"]): v for v in health["rate_limits"]}
    assert views[("tokens", "day")]["used"] == tokens and views[("tokens", "day")]["limit"] == int(CASES[case][0])
    assert views[("spend", "day")]["used"] == format_money(spend)
    assert UNPRICED in health["models_budget_refused"]["no_price"]
    assert rl.Metric.SPEND.value in {m for m, _ in views}
