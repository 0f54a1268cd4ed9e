"""Token and spend budgets in the pure core, against a brute-force ledger.

Every reservation the limiter hands out is kept in a ledger with what it was charged per
tier; refunds drop it, settlements replace its amounts. Whatever the interleaving of
admissions (several tasks, mixed models, priced or not, free local ones), settlements
(real usage below the estimate, or above it), refunds, restarts, real time passing and the
clock stepping back:

* each decision is exactly the documented rule: NO_PRICE for an unpriced model under a
  spend tier, TOO_BIG for a task larger than a tier's limit, else first come first served
  while every tier has room (an amount of 0 needs none);
* the counters equal the ledger (the recorded total is what was charged and settled);
* with estimates that are upper bounds, no tier ever holds more than its limit;
* settled spend is the exact price rounded up per task (never below what was spent), and
  settled tokens add up to the request's real usage exactly;
* a state rebuilt from the persisted charges equals the one in memory.
"""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from processor.pure import budget
from processor.pure import ratelimit as rl

STARTS = [datetime(2026, 3, 29, 0, 30, tzinfo=ZoneInfo("UTC")).timestamp(),
          datetime(2026, 12, 31, 23, 59, 59, tzinfo=ZoneInfo("UTC")).timestamp()]
PRICES = {"a": budget.ModelPrice(2_000_000, 8_000_000), "b": budget.ModelPrice(20_000)}
MODELS = ["a", "b", "x", None]  # x has no price; None is a free (local) task


@given(total=st.integers(0, 10**9), weights=st.lists(st.integers(0, 10**6), max_size=20))
def test_split_adds_up_exactly_and_is_proportional(total, weights):
    shares = budget.split(total, weights)
    assert len(shares) == len(weights) and sum(shares) == total if weights else shares == []
    w = weights if any(weights) else [1] * len(weights)
    for s, x in zip(shares, w, strict=True):
        exact = Fraction(total * x, sum(w))
        assert math.floor(exact) <= s <= math.ceil(exact)


@given(price_in=st.integers(0, 10**8), price_out=st.integers(0, 10**8), tin=st.integers(0, 10**7), tout=st.integers(0, 10**7))
def test_cost_is_the_exact_price_rounded_up(price_in, price_out, tin, tout):
    exact = Fraction(tin * price_in + tout * price_out, 1000)  # nano-units
    c = budget.cost(budget.ModelPrice(price_in, price_out), tin, tout)
    assert exact <= c < exact + 1


@given(st.decimals(min_value=0, max_value=10**6, places=9, allow_nan=False, allow_infinity=False))
def test_money_parses_exactly_and_formats_back(d):
    nano = budget.parse_money(str(d))
    assert nano == int(d * budget.NANO)
    assert Decimal(budget.format_money(nano)) == d


def test_prices_per_million_tokens():
    assert budget.parse_price("2.00") == 2_000_000 and budget.parse_price(0.02) == 20_000
    assert budget.cost(budget.DEFAULT_PRICES["o3"], 1_000_000, 1_000_000) == 10 * budget.NANO  # 2 + 8 USD
    assert budget.cost(budget.DEFAULT_PRICES["text-embedding-3-small"], 1_000_000, 0) == budget.NANO // 50  # 0.02
    assert budget.token_upper_bound("ação") == 6  # UTF-8 bytes
    assert rl.Demand.upper_bound("ação", "o3", max_output_tokens=500, overhead=7) == rl.Demand(13, 500, "o3")


def counts(strategy, tz, tier, at, bucket, now):
    """Does a charge in `bucket` (made at `at`) count in `tier` at effective time `now`?"""
    if strategy is rl.Strategy.FIXED:
        return bucket == rl.bucket_of(strategy, tz, tier.period, now)
    g, w = rl.GRANULARITY[tier.period], rl.ROLLING_WINDOW[tier.period]
    return at <= now and now < bucket + g + w + rl.SLACK


class Entry:
    def __init__(self, r: rl.Reservation) -> None:
        self.r = r
        self.settled = False
        self.exact_spend: Fraction | None = None


class BudgetMachine(RuleBasedStateMachine):
    @initialize(
        strategy=st.sampled_from(list(rl.Strategy)),
        start=st.sampled_from(STARTS),
        tasks=st.fixed_dictionaries({}, optional={rl.Period.MINUTE: st.integers(1, 6), rl.Period.DAY: st.integers(1, 20)}),
        tokens=st.fixed_dictionaries({}, optional={p: st.integers(1, 6_000) for p in (rl.Period.MINUTE, rl.Period.HOUR, rl.Period.MONTH)}),
        spend=st.fixed_dictionaries({}, optional={p: st.integers(1, 40_000) for p in (rl.Period.DAY, rl.Period.MONTH)}),
    )
    def setup(self, strategy, start, tasks, tokens, spend):
        self.tz = ZoneInfo("Europe/Berlin")
        self.strategy = strategy
        self.limits = (tasks, tokens, spend)
        self.state = rl.new_state(tasks, strategy=strategy, tz=self.tz, tokens=tokens, spend=spend, prices=PRICES)
        self.real = start
        self.offset = 0.0
        self.ledger: list[Entry] = []
        self.persisted: dict[tuple[rl.Metric, rl.Period, int], int] = {}
        self.persisted_hw: float | None = None
        self.overshot = False

    @property
    def wall(self):
        return self.real + self.offset

    def _persist(self, charges, hw=None):
        for c in charges:
            k = (c.metric, c.period, c.bucket)
            self.persisted[k] = self.persisted.get(k, 0) + c.units
            if self.persisted[k] <= 0:
                del self.persisted[k]
        if hw is not None:  # as the shell does: the mark is stored whenever it moves
            self.persisted_hw = hw if self.persisted_hw is None else max(self.persisted_hw, hw)

    def _used(self, tier, now):
        return sum(c.units for e in self.ledger for c in e.r.charges
                   if c.metric is tier.metric and c.period is tier.period and counts(self.strategy, self.tz, tier, e.r.at, c.bucket, now))

    @rule(step=st.sampled_from([0.5, 30, 61, 3601, 86401, 31 * 86400]))
    def advance(self, step):
        self.real += step

    @rule(back=st.sampled_from([1, 61, 3601, 86401]))
    def clock_steps_back(self, back):
        self.offset -= back

    @rule(demands=st.lists(st.builds(rl.Demand, st.integers(0, 3_000), st.integers(0, 3_000), st.sampled_from(MODELS)), max_size=4))
    def admit(self, demands):
        e = rl.effective_now(self.state, self.wall)
        used = {rl.tier_key(t): self._used(t, e) for t in self.state.tiers}
        expected = []
        blocked = False
        for d in demands:
            if self.state.has_spend and d.model is not None and d.model not in PRICES:
                expected.append(rl.Refusal.NO_PRICE)
                continue
            spend = budget.cost(PRICES[d.model], d.tokens_in, d.tokens_out) if d.model in PRICES and self.state.has_spend else 0
            need = {rl.tier_key(t): 1 if t.metric is rl.Metric.TASKS else d.tokens_in + d.tokens_out if t.metric is rl.Metric.TOKENS else spend
                    for t in self.state.tiers}
            if any(need[rl.tier_key(t)] > t.limit for t in self.state.tiers):
                expected.append(rl.Refusal.TOO_BIG)
            elif blocked or any(a and used[k] + a > lim for k, a, lim in ((rl.tier_key(t), need[rl.tier_key(t)], t.limit) for t in self.state.tiers)):
                blocked = True
                expected.append(rl.Refusal.LIMIT)
            else:
                for k, a in need.items():
                    used[k] += a
                expected.append(None)
        self.state, dec = rl.admit(self.state, self.wall, demands)
        if self.state.tiers:
            assert list(dec.refusals) == expected
        assert [r is None for r in dec.reservations] == [x is not None for x in dec.refusals]
        if rl.Refusal.LIMIT in dec.refusals:
            assert dec.retry_at is not None and dec.retry_at > e
        for r in dec.reservations:
            if r is not None:
                self.ledger.append(Entry(r))
        self._persist(dec.charges, self.state.high_water)

    @precondition(lambda self: any(not e.settled for e in getattr(self, "ledger", [])))
    @rule(data=st.data())
    def settle(self, data):
        open_ = [e for e in self.ledger if not e.settled]
        group = data.draw(st.lists(st.sampled_from(open_), min_size=1, max_size=3, unique_by=id))
        est_in, est_out = sum(e.r.tokens_in for e in group), sum(e.r.tokens_out for e in group)
        if data.draw(st.integers(0, 3)) == 0:  # now and then, more than estimated
            real_in = est_in + data.draw(st.integers(0, 500))
            real_out = est_out + data.draw(st.integers(1, 500))
        else:
            real_in = data.draw(st.integers(0, est_in))
            real_out = data.draw(st.integers(0, est_out))
        self.overshot |= real_in > est_in or real_out > est_out
        self.state, charges, settled = rl.settle(self.state, [e.r for e in group], real_in, real_out)
        assert sum(r.tokens_in for r in settled) == real_in and sum(r.tokens_out for r in settled) == real_out
        for e, r in zip(group, settled, strict=True):
            assert (r.at, r.units, r.model) == (e.r.at, e.r.units, e.r.model)
            assert [(c.metric, c.period, c.bucket) for c in r.charges] == [(c.metric, c.period, c.bucket) for c in e.r.charges]
            if r.model in PRICES:
                p = PRICES[r.model]
                exact = Fraction(r.tokens_in * p.input + r.tokens_out * p.output, 1000)
                assert exact <= r.spend < exact + 1  # never understates what was spent
            e.r, e.settled = r, True
        assert self.state.high_water >= max(e.r.at for e in group)
        self._persist(charges, self.state.high_water)

    @precondition(lambda self: any(not e.settled for e in getattr(self, "ledger", [])))
    @rule(data=st.data())
    def refund(self, data):
        open_ = [e for e in self.ledger if not e.settled]
        group = data.draw(st.lists(st.sampled_from(open_), min_size=1, max_size=3, unique_by=id))
        self.state, charges = rl.refund(self.state, [e.r for e in group])
        self.ledger = [e for e in self.ledger if all(e is not g for g in group)]
        self._persist(charges)

    @rule()
    def restart(self):
        tasks, tokens, spend = self.limits
        fresh = rl.new_state(tasks, strategy=self.strategy, tz=self.tz, tokens=tokens, spend=spend, prices=PRICES)
        self.state = rl.with_counts(fresh, [(m, p, b, n) for (m, p, b), n in self.persisted.items()], high_water=self.persisted_hw)

    @invariant()
    def counters_equal_the_ledger_and_hold_the_limits(self):
        if not hasattr(self, "state"):
            return
        e = rl.effective_now(self.state, self.wall)
        by_key = {rl.tier_key(t): t for t in self.state.tiers}
        for u in rl.usage(self.state, self.wall):
            tier = by_key[(u.metric, u.period)]
            assert u.used == self._used(tier, e)
            if not self.overshot:
                assert u.used <= u.limit

    @invariant()
    def reload_equals_memory(self):
        if not hasattr(self, "state"):
            return
        tasks, tokens, spend = self.limits
        fresh = rl.new_state(tasks, strategy=self.strategy, tz=self.tz, tokens=tokens, spend=spend, prices=PRICES)
        loaded = rl.with_counts(fresh, [(m, p, b, n) for (m, p, b), n in self.persisted.items()], high_water=self.persisted_hw)
        t = rl.effective_now(self.state, self.wall)
        assert rl.usage(loaded, t) == rl.usage(self.state, t)


BudgetMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestBudget = BudgetMachine.TestCase
