"""Token and spend budgets in the stages (`stages/budget.py`, the claim and compute stages)
over a real SQLite limiter: what a claim reserves, what a call's usage settles, what stays
spent after a failure, and the tasks a budget leaves pending.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from processor.effects.backends.base import EmbedResult
from processor.effects.backends.mock import MockBackend
from processor.effects.limiter import SqliteLimiter
from processor.effects.metrics import Metrics
from processor.pure import ratelimit as rl
from processor.pure.budget import DEFAULT_PRICES, cost, parse_money
from processor.pure.faults import DependencyError, Fault
from processor.pure.lifecycle import Phase
from processor.pure.tasks import Backend
from processor.stages import embed
from processor.stages.budget import BudgetPort
from tests.stages.conftest import World, claim_all, drain, make_world, tid, wall

MODEL = "text-embedding-3-small"
LOCAL = "nomic-embed-text"
PRICE = DEFAULT_PRICES[MODEL]
TEXT = "x" * 300  # 300 UTF-8 bytes: reserved 300 tokens; the mock reports 300 // 3 + 1 = 101


class Failing(MockBackend):
    """The mock, failing every call with `fault` while `fail` is set."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.fail: Fault | None = None

    async def embed(self, model: str, texts: Any, *, timeout: float | None = None) -> EmbedResult:
        if self.fail is not None:
            raise DependencyError(f"fake: {self.fail.value}", self.fail, status=500)
        return await super().embed(model, texts, timeout=timeout)


def budget_world(tmp_path: Any, *, tokens: int = 0, spend: str = "0", tasks: int = 0, embedder: Any = None,
                 max_retries: int = 0, **kw: Any) -> tuple[World, SqliteLimiter]:
    """A world whose global limiter is a real SQLite one with these tiers (so the budget
    stage is on: `KindPorts.budget` is a `BudgetPort`)."""
    metrics = Metrics()
    lim = SqliteLimiter(str(tmp_path / "rl.db"), {rl.Period.DAY: tasks} if tasks else {}, strategy=rl.Strategy.FIXED,
                        tz_name="UTC", metrics=metrics, clock=wall,
                        tokens={rl.Period.DAY: tokens} if tokens else None,
                        spend={rl.Period.DAY: parse_money(spend)} if spend != "0" else None, prices={MODEL: PRICE})
    w = make_world(tmp_path, embedder=embedder or Failing(8), MAX_RETRIES=max_retries, limiter=lim, metrics=metrics, **kw)
    assert isinstance(w.p.stages.embed.ports.budget, BudgetPort)
    return w, lim


def used(lim: SqliteLimiter, metric: rl.Metric) -> int:
    return sum(u.used for u in lim.usage() if u.metric is metric)


@pytest.fixture
def lane():
    return trio.open_memory_channel[list[str]](1000)


async def test_a_claim_reserves_the_upper_bound_and_the_call_settles_its_real_usage(tmp_path, lane, autojump_clock):
    w, lim = budget_world(tmp_path, tokens=100_000, spend="1")
    works = [w.work(i, TEXT, model=MODEL) for i in range(3)]
    claimed = await claim_all(w, works)
    assert len(claimed) == 3
    assert used(lim, rl.Metric.TOKENS) == 900 and used(lim, rl.Metric.SPEND) == 3 * cost(PRICE, 300, 0)
    await embed.compute_batch(w.p.stages.embed, claimed, lane[0])
    assert drain(lane[1]) == [tid(i) for i in range(3)]
    assert used(lim, rl.Metric.TOKENS) == 303  # what the backend said the call used
    assert used(lim, rl.Metric.SPEND) == 3 * cost(PRICE, 101, 0)
    w.close()


async def test_a_failed_call_keeps_its_reservation_and_a_refused_claim_gives_it_back(tmp_path, lane, autojump_clock):
    w, lim = budget_world(tmp_path, tokens=100_000)
    backend = w.embedder
    claimed = await claim_all(w, [w.work(i, TEXT, model=MODEL) for i in range(2)])
    backend.fail = Fault.SERVER  # type: ignore[attr-defined]
    await embed.compute_batch(w.p.stages.embed, claimed[:1], lane[0])  # reached the backend, no usage known
    assert used(lim, rl.Metric.TOKENS) == 600
    await w.p.book.release([tid(1)], "shutdown")  # never reached a backend: given back whole
    assert used(lim, rl.Metric.TOKENS) == 300
    w.close()


@pytest.mark.parametrize(("fault", "tokens"), [(Fault.MALFORMED, 300), (Fault.BUSY, 101), (Fault.RATE_LIMITED, 101)])
async def test_a_call_retried_after_an_attempt_that_may_have_been_billed_keeps_its_reservations(
        tmp_path, lane, autojump_clock, fault, tokens):
    class Flaky(Failing):
        async def embed(self, model: str, texts: Any, *, timeout: float | None = None) -> EmbedResult:
            if self.requests == 0:
                self.requests += 1
                raise DependencyError(f"fake: {fault.value}", fault)
            return await super().embed(model, texts, timeout=timeout)

    w, lim = budget_world(tmp_path, tokens=100_000, embedder=Flaky(8), max_retries=2)
    claimed = await claim_all(w, [w.work(0, TEXT, model=MODEL)])
    await embed.compute_batch(w.p.stages.embed, claimed, lane[0])
    assert drain(lane[1]) == [tid(0)]
    # a malformed answer may have been billed: the reservation stays; a 503 or 429 was not
    assert used(lim, rl.Metric.TOKENS) == tokens
    w.close()


async def test_a_model_without_a_price_stays_pending_under_a_spend_cap(tmp_path, autojump_clock):
    w, lim = budget_world(tmp_path, spend="1")
    works = [w.work(0, TEXT, model="no-such-price"), w.work(1, TEXT, model=MODEL), w.work(2, TEXT, model="no-such-price")]
    claimed = await claim_all(w, works)
    assert [x.id for x in claimed] == [tid(1)]  # the priced one goes on; the others are not held back by it
    assert w.p.book.phase(tid(0)) is None and w.p.book.phase(tid(2)) is None
    assert [p.task_id for p in w.api.sent("in_progress")] == [tid(1)]  # never claimed, never failed
    assert w.p.book.known(tid(0))  # not taken again at the next poll
    assert w.metric("ai_tasks_budget_refused_total", reason="no_price", model="no-such-price") == 2
    assert "no-such-price" in w.p.board.budget_refused["no_price"]
    assert used(lim, rl.Metric.SPEND) == cost(PRICE, 300, 0)
    w.close()


async def test_a_task_bigger_than_a_whole_tier_stays_pending(tmp_path, autojump_clock):
    w, _ = budget_world(tmp_path, tokens=200)
    claimed = await claim_all(w, [w.work(0, TEXT, model=MODEL), w.work(1, "small", model=MODEL)])
    assert [x.id for x in claimed] == [tid(1)]
    assert w.metric("ai_tasks_budget_refused_total", reason="too_big", model=MODEL) == 1
    w.close()


async def test_a_budget_pause_ends_when_a_settlement_frees_room(tmp_path, lane, autojump_clock):
    w, lim = budget_world(tmp_path, tokens=700)  # two reservations of 300 fit, a third does not
    claimed = await claim_all(w, [w.work(i, TEXT, model=MODEL) for i in range(3)])
    assert [x.id for x in claimed] == [tid(0), tid(1)]
    assert w.p.admission.paused  # a budget pause: at most POLLING_INTERVAL_SECONDS
    assert w.p.admission.paused_until <= trio.current_time() + w.p.config.polling_interval_seconds + 0.01
    woke = trio.Event()

    async def sleeper() -> None:
        await w.p.admission.sleep_while_paused(w.p.stopping)
        woke.set()

    async with trio.open_nursery() as n:
        n.start_soon(sleeper)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        await embed.compute_batch(w.p.stages.embed, claimed, lane[0])  # 600 reserved -> 202 used
        await woke.wait()
    assert not w.p.admission.paused
    assert [x.id for x in await claim_all(w, [w.work(2, TEXT, model=MODEL)])] == [tid(2)]
    assert used(lim, rl.Metric.TOKENS) == 502
    w.close()


async def test_a_task_tier_pause_is_not_lifted_by_a_settlement(tmp_path, lane, autojump_clock):
    w, _ = budget_world(tmp_path, tokens=100_000, tasks=1)
    claimed = await claim_all(w, [w.work(i, TEXT, model=MODEL) for i in range(2)])
    assert len(claimed) == 1 and w.p.admission.paused
    until = w.p.admission.paused_until
    await embed.compute_batch(w.p.stages.embed, claimed, lane[0])
    assert w.p.admission.paused_until == until and until > trio.current_time() + 3600
    w.close()


async def test_without_budgets_nothing_is_settled(world: World, lane, autojump_clock):
    assert world.p.stages.embed.ports.budget is None
    claimed = await claim_all(world, [world.work(0)])
    await embed.compute_batch(world.p.stages.embed, claimed, lane[0])
    assert drain(lane[1]) == [tid(0)] and world.p.book.phase(tid(0)) is Phase.COMPUTED


@pytest.mark.parametrize("ollama_serves", [True, False])
async def test_an_ollama_task_with_a_fallback_is_reserved_at_the_fallbacks_price(tmp_path, lane, autojump_clock, ollama_serves):
    openai = MockBackend(8)
    w, lim = budget_world(tmp_path, spend="1", backend=Backend.OLLAMA, extra={Backend.OPENAI: openai},
                          FALLBACK_MODELS=f'{{"{LOCAL}": "{MODEL}"}}')
    claimed = await claim_all(w, [w.work(i, TEXT, model=LOCAL) for i in range(2)])
    assert len(claimed) == 2 and used(lim, rl.Metric.SPEND) == 2 * cost(PRICE, 300, 0)  # whichever serves it
    if not ollama_serves:
        w.embedder.fail = Fault.MODEL_MISSING  # type: ignore[attr-defined]
    await embed.compute_batch(w.p.stages.embed, claimed, lane[0])
    assert sorted(drain(lane[1])) == [tid(0), tid(1)]
    assert openai.requests == (0 if ollama_serves else 1)
    # Ollama costs nothing; the fallback costs its price for the tokens it used
    assert used(lim, rl.Metric.SPEND) == (0 if ollama_serves else 2 * cost(PRICE, 101, 0))
    w.close()
