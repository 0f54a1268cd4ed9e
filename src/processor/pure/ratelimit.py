"""Multi-tier rate limiting: minute, hour, day, week, month; rolling or calendar windows.

One unit is one task sent to a backend. `admit(state, now, n)` reserves up to `n` units,
all-or-nothing across tiers (every admitted unit is charged on every tier) and partial
across units ("3 of the 5 fit"). The decision carries one `Reservation` per admitted unit:
the exact instant and bucket per tier it was charged to. `refund(state, reservations)`
gives back units that never reached a backend to those same buckets, however much later
it runs (a refund read from a later clock could land in the next period at a fixed-window
edge and free room that was never used).

The clock may step back (NTP, a VM restored, a Redis failover). The state keeps a high-water
mark of every `now` it has seen (persisted with the charges) and evaluates every admission
at `max(now, high_water)`: a clock that steps back across a period edge never re-opens a
period already used. Seen from real time, effective time then advances no faster than real
time, so no real window holds more than a window of effective time does.

Counters live in buckets so that state is bounded whatever the traffic:

* rolling: a bucket of `granularity` seconds per tier (1 s for the minute tier, 60 s for
  the hour, 5 min for the day, 1 h for week and month). A unit reserved at `t` falls in
  bucket `b = floor(t / g) * g` and is counted while `now < b + g + window + SLACK`: never
  less than the exact rule (`now < t + window`), at most one bucket and one second longer. The limiter can
  therefore only be stricter than exact, never looser.
* fixed: one bucket per tier, keyed by the start of the calendar period that holds `now`
  in the configured time zone (the zone object is an argument; no clock, no I/O here).

Rolling windows are the last 60 s, 3,600 s, 86,400 s, 7 days and 30 days.

Budgets are tiers too (`Metric`): besides task counts, tokens (input plus output) and
spend (nano-units of money, see `processor.pure.budget`). `admit(state, now, demands)`
takes one `Demand` per task (its token estimate and model); a task whose model has no price
while a spend tier is on is refused with `Refusal.NO_PRICE`, one larger than a tier's whole
limit with `Refusal.TOO_BIG`, and neither holds the others back. `settle(state,
reservations, tokens_in, tokens_out)` replaces the estimate by a request's real usage, in the
buckets reserved: it can lower or raise the charge, and records the truth even above a
limit (admissions then wait for room).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, tzinfo

import attrs

from processor.pure.budget import ModelPrice, cost, split, token_upper_bound


class Period(enum.Enum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class Strategy(enum.Enum):
    ROLLING = "rolling"
    FIXED = "fixed"


class Metric(enum.Enum):
    TASKS = "tasks"  # tasks sent to a backend
    TOKENS = "tokens"  # input plus output tokens
    SPEND = "spend"  # nano-units of the price table's currency


class Refusal(enum.Enum):
    LIMIT = "limit"  # a tier has no room now; `Decision.retry_at` says when
    NO_PRICE = "no_price"  # a spend tier is on and the task's model has no price: leave it pending
    TOO_BIG = "too_big"  # the task alone needs more than a tier's whole limit: it can never fit


ROLLING_WINDOW: dict[Period, int] = {
    Period.MINUTE: 60,
    Period.HOUR: 3_600,
    Period.DAY: 86_400,
    Period.WEEK: 7 * 86_400,
    Period.MONTH: 30 * 86_400,
}
# Rolling units are held this much longer than their bucket needs, so that a claim that
# reaches the API a moment after its reservation still fits the window as the API sees it.
SLACK = 1
GRANULARITY: dict[Period, int] = {
    Period.MINUTE: 1,
    Period.HOUR: 60,
    Period.DAY: 300,
    Period.WEEK: 3_600,
    Period.MONTH: 3_600,
}


@attrs.frozen
class Tier:
    period: Period
    limit: int
    buckets: Mapping[int, int] = attrs.field(factory=dict)  # bucket start (epoch s) -> units
    metric: Metric = Metric.TASKS


@attrs.frozen
class LimiterState:
    strategy: Strategy
    tz: tzinfo
    tiers: tuple[Tier, ...]
    high_water: float = -math.inf  # the latest `now` seen; admissions are never evaluated earlier
    prices: Mapping[str, ModelPrice] = attrs.field(factory=dict)  # model -> price, for spend tiers

    @property
    def has_spend(self) -> bool:
        return any(t.metric is Metric.SPEND for t in self.tiers)


@attrs.frozen
class Demand:
    """What one task may cost: one task, its tokens (an upper bound keeps caps exact), and
    the model its spend is priced by (None: free, e.g. a local backend)."""

    tokens_in: int = 0
    tokens_out: int = 0
    model: str | None = None

    @classmethod
    def upper_bound(cls, prompt: str, model: str | None, *, max_output_tokens: int = 0, overhead: int = 0) -> Demand:
        """A demand no real call can exceed: the prompt's UTF-8 bytes (plus `overhead`
        tokens for message framing) in, `max_output_tokens` out. With these, caps hold
        exactly. `model=None` for a task that costs nothing (a local backend)."""
        return cls(token_upper_bound(prompt) + overhead, max_output_tokens, model)


def effective_now(state: LimiterState, now: float) -> float:
    """The instant the limiter evaluates `now` at: never earlier than one already seen."""
    return max(now, state.high_water)


@attrs.frozen
class Charge:
    """One counter increment the store must persist (negative for a refund)."""

    period: Period
    bucket: int
    units: int
    metric: Metric = Metric.TASKS


@attrs.frozen
class Reservation:
    """What one admitted task was charged: the instant (after the high-water clamp) and the
    bucket and amount per tier. Hand it back to `refund` or `settle` as is; it never needs
    the clock again."""

    at: float
    units: int
    charges: tuple[Charge, ...]  # one per tier that was on: (period, bucket, amount, metric)
    tokens_in: int = 0  # reserved (estimate) or, once settled, used
    tokens_out: int = 0
    spend: int = 0  # nano-units
    model: str | None = None


@attrs.frozen
class Decision:
    requested: int
    admitted: int
    charges: tuple[Charge, ...] = ()
    retry_at: float | None = None  # when a unit may fit again, if not all were admitted
    exhausted: tuple[Period, ...] = ()  # task tiers with no room left after this decision
    # Aligned with the request: a Reservation for each admitted task, None for a refused one
    # (admitted tasks come first unless a task was refused for NO_PRICE or TOO_BIG).
    reservations: tuple[Reservation | None, ...] = ()
    at: float | None = None  # the instant this decision was evaluated at (effective time)
    refusals: tuple[Refusal | None, ...] = ()  # aligned with the request
    unpriced: tuple[str, ...] = ()  # models refused for NO_PRICE, each once
    exhausted_budgets: tuple[tuple[Metric, Period], ...] = ()  # token / spend tiers with no room left

    def admitted_indexes(self) -> list[int]:
        return [i for i, r in enumerate(self.reservations) if r is not None]


@attrs.frozen
class TierUsage:
    period: Period
    used: int
    limit: int
    remaining: int
    resets_at: float | None  # rolling: when the oldest counted unit expires; fixed: period end
    metric: Metric = Metric.TASKS


def new_state(
    limits: Mapping[Period, int],
    *,
    strategy: Strategy = Strategy.ROLLING,
    tz: tzinfo,
    tokens: Mapping[Period, int] | None = None,
    spend: Mapping[Period, int] | None = None,
    prices: Mapping[str, ModelPrice] | None = None,
) -> LimiterState:
    """A limiter for the tiers whose limit is > 0 (0 means off): task counts, tokens, and
    spend in nano-units (priced by `prices`, model -> price)."""
    tiers = tuple(
        Tier(p, int(lim[p]), metric=m)
        for m, lim in ((Metric.TASKS, limits), (Metric.TOKENS, tokens or {}), (Metric.SPEND, spend or {}))
        for p in Period
        if lim.get(p, 0) > 0
    )
    return LimiterState(strategy, tz, tiers, prices=dict(prices or {}))


def tier_key(tier: Tier) -> tuple[Metric, Period]:
    return (tier.metric, tier.period)


# --- calendar periods ---------------------------------------------------------------


def calendar_period(period: Period, now: float, tz: tzinfo) -> tuple[float, float]:
    """[start, end) of the calendar period holding `now`, in zone `tz`.

    Minute and hour periods are cut on the local clock (a +05:30 zone's hours start at :30
    UTC); day, ISO week (Monday 00:00) and month start at local midnight, so a DST day has
    23 or 25 hours.
    """
    whole = math.floor(now)  # integer arithmetic: no float drift at period edges
    local = datetime.fromtimestamp(whole, tz)
    if period is Period.MINUTE:
        first = whole - local.second
        return float(first), float(first + 60)
    if period is Period.HOUR:
        first = whole - (local.minute * 60 + local.second)
        return float(first), float(first + 3_600)
    if period is Period.DAY:
        day = local.date()
        nxt = day + timedelta(days=1)
    elif period is Period.WEEK:
        day = local.date() - timedelta(days=local.weekday())
        nxt = day + timedelta(days=7)
    else:
        day = local.date().replace(day=1)
        nxt = (day.replace(year=day.year + 1, month=1) if day.month == 12 else day.replace(month=day.month + 1))
    start: float = datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()
    end: float = datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz).timestamp()
    if not start <= now < end:  # a zone whose midnight does not exist: fall back to local dates
        start = min(start, now)
        end = max(end, now + 1)
    return start, end


def bucket_of(strategy: Strategy, tz: tzinfo, period: Period, t: float) -> int:
    """The bucket key a unit reserved at time `t` is counted in."""
    if strategy is Strategy.FIXED:
        return math.floor(calendar_period(period, t, tz)[0])
    g = GRANULARITY[period]
    return math.floor(t / g) * g


def _counted(state: LimiterState, tier: Tier, now: float) -> dict[int, int]:
    """The buckets of `tier` that still count at `now`."""
    if state.strategy is Strategy.FIXED:
        key = bucket_of(state.strategy, state.tz, tier.period, now)
        n = tier.buckets.get(key, 0)
        return {key: n} if n else {}
    g, w = GRANULARITY[tier.period], ROLLING_WINDOW[tier.period]
    return {b: n for b, n in tier.buckets.items() if now < b + g + w + SLACK and n > 0}


def _used(state: LimiterState, tier: Tier, now: float) -> int:
    return sum(_counted(state, tier, now).values())


def _free_at(state: LimiterState, tier: Tier, now: float, need: int) -> float:
    """Earliest time at which `need` more units fit in `tier` (ignoring new charges)."""
    if state.strategy is Strategy.FIXED:
        if _used(state, tier, now) + need <= tier.limit:
            return now
        return calendar_period(tier.period, now, state.tz)[1]
    g, w = GRANULARITY[tier.period], ROLLING_WINDOW[tier.period]
    counted = sorted(_counted(state, tier, now).items())
    excess = sum(n for _, n in counted) + need - tier.limit
    if excess <= 0:
        return now  # fits already
    for b, n in counted:
        excess -= n
        if excess <= 0:
            return float(b + g + w + SLACK)
    return now  # unreachable: every counted unit expires eventually


def next_free_at(state: LimiterState, now: float, need: int = 1) -> float:
    """Earliest time at which `need` more tasks fit in every task tier (no other admissions)."""
    return demand_free_at(state, now, {tier_key(t): need for t in state.tiers if t.metric is Metric.TASKS})


def demand_free_at(state: LimiterState, now: float, amounts: Mapping[tuple[Metric, Period], int]) -> float:
    """Earliest time at which these amounts (per tier) fit (no other admissions)."""
    t = effective_now(state, now)
    return max((_free_at(state, tier, t, amounts[tier_key(tier)]) for tier in state.tiers if amounts.get(tier_key(tier), 0) > 0), default=t)


def usage(state: LimiterState, now: float) -> list[TierUsage]:
    now = effective_now(state, now)
    out = []
    for tier in state.tiers:
        counted = _counted(state, tier, now)
        used = sum(counted.values())
        if state.strategy is Strategy.FIXED:
            resets = calendar_period(tier.period, now, state.tz)[1]
        elif counted:
            resets = float(min(counted) + GRANULARITY[tier.period] + ROLLING_WINDOW[tier.period] + SLACK)
        else:
            resets = None
        out.append(TierUsage(tier.period, used, tier.limit, max(0, tier.limit - used), resets, tier.metric))
    return out


def _prune(state: LimiterState, tier: Tier, now: float) -> dict[int, int]:
    """Drop buckets that can never count again (effective time never moves back)."""
    if state.strategy is Strategy.FIXED:
        start = bucket_of(state.strategy, state.tz, tier.period, now)
        return {b: n for b, n in tier.buckets.items() if b >= start}
    g, w = GRANULARITY[tier.period], ROLLING_WINDOW[tier.period]
    return {b: n for b, n in tier.buckets.items() if now < b + g + w + SLACK}


def spend_of(state: LimiterState, demand: Demand) -> int | None:
    """Nano-units `demand` costs; None when its model has no price (0 for a free task)."""
    if demand.model is None:
        return 0
    price = state.prices.get(demand.model)
    return None if price is None else cost(price, demand.tokens_in, demand.tokens_out)


def _amounts(tier: Tier, tokens: int, spend: int) -> int:
    return 1 if tier.metric is Metric.TASKS else tokens if tier.metric is Metric.TOKENS else spend


@attrs.frozen
class Planned:
    """One task of an admission request, before the counters are looked at."""

    demand: Demand
    refusal: Refusal | None  # NO_PRICE or TOO_BIG (decided without the counters), else None
    need: tuple[int, ...] = ()  # amount per tier (in `state.tiers` order)
    spend: int = 0


def plan(state: LimiterState, n: int | Sequence[Demand]) -> list[Planned]:
    """What each task would need per tier, and the refusals that do not depend on the
    counters. (The Redis script is given the needs of the tasks that are not refused.)"""
    if isinstance(n, int):
        if n < 0:
            raise ValueError("n must be >= 0")
        return plan(state, [Demand()])[:1] * n  # n identical tasks: one plan, n times
    out = []
    for d in n:
        spend = spend_of(state, d) if state.has_spend else 0
        if spend is None:
            out.append(Planned(d, Refusal.NO_PRICE))
            continue
        if d.tokens_in < 0 or d.tokens_out < 0:
            raise ValueError("token estimates must be >= 0")
        need = tuple(_amounts(tier, d.tokens_in + d.tokens_out, spend) for tier in state.tiers)
        if any(a > tier.limit for a, tier in zip(need, state.tiers, strict=True)):
            out.append(Planned(d, Refusal.TOO_BIG, need, spend))
        else:
            out.append(Planned(d, None, need, spend))
    return out


def greedy(state: LimiterState, t: float, plans: Sequence[Planned]) -> int:
    """How many of the plans without a refusal fit, in order (the first that does not fit
    stops the rest): the rule the Redis script applies too."""
    used = [_used(state, tier, t) for tier in state.tiers]
    k = 0
    for p in plans:
        if p.refusal is not None:
            continue
        if not all(a == 0 or used[i] + a <= tier.limit for i, (a, tier) in enumerate(zip(p.need, state.tiers, strict=True))):
            break
        for i, a in enumerate(p.need):
            used[i] += a
        k += 1
    return k


def decide(
    before: LimiterState, after: LimiterState, t: float, plans: Sequence[Planned], k: int
) -> Decision:
    """The decision once the first `k` unrefused plans were charged at `t` (`after` holds
    them). Shared by the pure core and the Redis limiter."""
    keys = [bucket_of(before.strategy, before.tz, tier.period, t) for tier in before.tiers]
    reservations: list[Reservation | None] = []
    refusals: list[Refusal | None] = []
    unpriced: list[str] = []
    added = [0] * len(before.tiers)
    blocked: dict[tuple[Metric, Period], int] | None = None
    taken = 0
    made: dict[int, Reservation] = {}
    for p in plans:
        if p.refusal is not None:
            reservations.append(None)
            refusals.append(p.refusal)
            if p.refusal is Refusal.NO_PRICE and p.demand.model is not None and p.demand.model not in unpriced:
                unpriced.append(p.demand.model)
        elif taken < k:
            taken += 1
            for i, a in enumerate(p.need):
                added[i] += a
            r = made.get(id(p))
            if r is None:  # the same plan (n identical tasks) makes the same (frozen) reservation
                r = made[id(p)] = Reservation(
                    t, 1, tuple(Charge(tier.period, keys[i], p.need[i], tier.metric) for i, tier in enumerate(before.tiers)),
                    p.demand.tokens_in, p.demand.tokens_out, p.spend, p.demand.model,
                )
            reservations.append(r)
            refusals.append(None)
        else:
            if blocked is None:
                blocked = {tier_key(tier): a for a, tier in zip(p.need, before.tiers, strict=True)}
            reservations.append(None)
            refusals.append(Refusal.LIMIT)
    charges = tuple(Charge(tier.period, keys[i], added[i], tier.metric) for i, tier in enumerate(before.tiers) if added[i])
    full = [tier for tier in after.tiers if _used(after, tier, t) >= tier.limit]
    exhausted = tuple(tier.period for tier in full if tier.metric is Metric.TASKS)
    budgets = tuple(tier_key(tier) for tier in full if tier.metric is not Metric.TASKS)
    retry_at = demand_free_at(after, t, blocked) if blocked is not None else None
    return Decision(len(plans), taken, charges, retry_at, exhausted, tuple(reservations), t,
                    tuple(refusals), tuple(unpriced), budgets)


def admit(state: LimiterState, now: float, n: int | Sequence[Demand]) -> tuple[LimiterState, Decision]:
    """Reserve for `n` tasks (or one per `Demand`) at `now` (evaluated at
    `effective_now(state, now)`). Tasks are taken in order: the first that does not fit
    stops the ones after it (first come, first served); a task refused for NO_PRICE or
    TOO_BIG does not."""
    plans = plan(state, n)
    t = effective_now(state, now)
    if not state.tiers:
        count = len(plans)
        return attrs.evolve(state, high_water=t), Decision(
            count, count, reservations=(Reservation(t, 1, ()),) * count, at=t, refusals=(None,) * count
        )
    k = greedy(state, t, plans)
    added = [0] * len(state.tiers)
    for p in [p for p in plans if p.refusal is None][:k]:
        for i, a in enumerate(p.need):
            added[i] += a
    new_tiers = []
    for i, tier in enumerate(state.tiers):
        buckets = _prune(state, tier, t)
        if added[i]:
            key = bucket_of(state.strategy, state.tz, tier.period, t)
            buckets[key] = buckets.get(key, 0) + added[i]
        new_tiers.append(attrs.evolve(tier, buckets=buckets))
    new = attrs.evolve(state, tiers=tuple(new_tiers), high_water=t)
    return new, decide(state, new, t, plans, k)


def reservation_at(state: LimiterState, at: float, units: int = 1) -> Reservation:
    """The task-tier reservation an admission evaluated at `at` made (to refund from a
    stored instant: `Reservation.at` is exact, so its buckets are the ones charged while the
    strategy and time zone are unchanged). Token and spend tiers get nothing back from it:
    what may have reached a backend stays spent."""
    return Reservation(at, units, tuple(
        Charge(t.period, bucket_of(state.strategy, state.tz, t.period, at), units) for t in state.tiers if t.metric is Metric.TASKS
    ))


def merge(reservations: Iterable[Reservation]) -> dict[tuple[Metric, Period, int], int]:
    """Amounts per (metric, period, bucket) held by these reservations together."""
    out: dict[tuple[Metric, Period, int], int] = {}
    for r in reservations:
        for c in r.charges:
            key = (c.metric, c.period, c.bucket)
            out[key] = out.get(key, 0) + c.units
    return out


def apply(state: LimiterState, deltas: Mapping[tuple[Metric, Period, int], int]) -> tuple[LimiterState, tuple[Charge, ...]]:
    """Add signed amounts to buckets: a negative one takes back at most what the bucket
    holds, a positive one is added even above the limit (the truth is recorded)."""
    new_tiers = []
    charges = []
    for tier in state.tiers:
        buckets = dict(tier.buckets)
        mine = sorted((b, n) for (m, p, b), n in deltas.items() if m is tier.metric and p is tier.period and n)
        for key, n in mine:
            have = buckets.get(key, 0)
            d = n if n > 0 else -min(have, -n)
            if d:
                if have + d:
                    buckets[key] = have + d
                else:
                    del buckets[key]
                charges.append(Charge(tier.period, key, d, tier.metric))
        new_tiers.append(attrs.evolve(tier, buckets=buckets))
    return attrs.evolve(state, tiers=tuple(new_tiers)), tuple(charges)


def refund(state: LimiterState, reservations: Iterable[Reservation]) -> tuple[LimiterState, tuple[Charge, ...]]:
    """Give back what these reservations were charged, to the buckets they were charged to
    (never below zero; a bucket already pruned has nothing left to give back)."""
    return apply(state, {k: -n for k, n in merge(reservations).items() if n > 0})


def settlement(
    state: LimiterState, reservations: Sequence[Reservation], tokens_in: int, tokens_out: int
) -> tuple[dict[tuple[Metric, Period, int], int], tuple[Reservation, ...]]:
    """The deltas that replace these reservations' estimates by one request's real usage
    (its totals shared out in proportion to the estimates, exactly), and the settled
    reservations. Spend is priced per reservation (rounded up) by the model it was
    reserved for; a model without a price costs what was reserved for it."""
    if tokens_in < 0 or tokens_out < 0:
        raise ValueError("token counts must be >= 0")
    ins = split(tokens_in, [r.tokens_in for r in reservations])
    outs = split(tokens_out, [r.tokens_out for r in reservations])
    deltas: dict[tuple[Metric, Period, int], int] = {}
    settled = []
    for r, ti, to in zip(reservations, ins, outs, strict=True):
        price = state.prices.get(r.model) if r.model is not None else None
        spend = 0 if r.model is None else cost(price, ti, to) if price is not None else r.spend
        charges = []
        for c in r.charges:
            new = c.units if c.metric is Metric.TASKS else ti + to if c.metric is Metric.TOKENS else spend
            if new != c.units:
                key = (c.metric, c.period, c.bucket)
                deltas[key] = deltas.get(key, 0) + new - c.units
            charges.append(attrs.evolve(c, units=new))
        settled.append(attrs.evolve(r, charges=tuple(charges), tokens_in=ti, tokens_out=to, spend=spend))
    return deltas, tuple(settled)


def settle(
    state: LimiterState, reservations: Sequence[Reservation], tokens_in: int, tokens_out: int
) -> tuple[LimiterState, tuple[Charge, ...], tuple[Reservation, ...]]:
    """Replace the estimates of one request's reservations by its real usage (see
    `settlement`), in the buckets they were reserved in. Returns the new state, the charges
    to persist, and the settled reservations."""
    deltas, settled = settlement(state, reservations, tokens_in, tokens_out)
    new, charges = apply(state, deltas)
    # the charges go to instants already seen: the mark covers them (also after a restart
    # whose store had no charge of theirs yet, e.g. a reservation of 0 tokens)
    hw = max([new.high_water, *(r.at for r in reservations)])
    return attrs.evolve(new, high_water=hw), charges, settled


Row = tuple[Metric, Period, int, int]  # (metric, period, bucket, amount), as stored


def with_counts(state: LimiterState, rows: Iterable[Row], *, high_water: float | None = None) -> LimiterState:
    """Load persisted counters (metric, period, bucket, amount) into a fresh state.

    Rows for tiers that are now off are ignored; a limit changed between runs applies to
    the counts already used. The high-water mark is the stored one, and never earlier than
    the latest bucket loaded (a store written before the mark existed).
    """
    by_tier: dict[tuple[Metric, Period], dict[int, int]] = {tier_key(t): dict(t.buckets) for t in state.tiers}
    hw = state.high_water if high_water is None else max(state.high_water, high_water)
    for metric, period, bucket, units in rows:
        if units > 0:
            hw = max(hw, float(bucket))
            if (metric, period) in by_tier:
                b = by_tier[(metric, period)]
                b[bucket] = b.get(bucket, 0) + units
    return attrs.evolve(
        state, tiers=tuple(attrs.evolve(t, buckets=by_tier[tier_key(t)]) for t in state.tiers), high_water=hw
    )


def prune_before(state: LimiterState, period: Period, now: float) -> int:
    """Bucket keys below this value can be deleted from storage."""
    now = effective_now(state, now)
    if state.strategy is Strategy.FIXED:
        return bucket_of(state.strategy, state.tz, period, now)
    return math.floor(now - ROLLING_WINDOW[period] - GRANULARITY[period] - SLACK)


def convert_rows(
    rows: Iterable[Row],
    *,
    from_strategy: Strategy,
    from_tz: tzinfo,
    to_state: LimiterState,
    now: float,
) -> list[Row]:
    """Re-key stored counters after RATE_LIMIT_STRATEGY or the time zone changed.

    Each old bucket's units are assumed to have been reserved as late as the bucket allows
    (never after `now`): the conversion can only make the limiter stricter.
    """
    out: dict[tuple[Metric, Period, int], int] = {}
    for metric, period, bucket, units in rows:
        if from_strategy is Strategy.FIXED:
            latest = calendar_period(period, bucket, from_tz)[1] - 1
        else:
            latest = bucket + GRANULARITY[period] - 1
        t = min(now, latest)
        key = (metric, period, bucket_of(to_state.strategy, to_state.tz, period, t))
        out[key] = out.get(key, 0) + units
    return [(m, p, b, u) for (m, p, b), u in out.items()]
