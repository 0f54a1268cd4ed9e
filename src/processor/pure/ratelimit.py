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
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, tzinfo

import attrs


class Period(enum.Enum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class Strategy(enum.Enum):
    ROLLING = "rolling"
    FIXED = "fixed"


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


@attrs.frozen
class LimiterState:
    strategy: Strategy
    tz: tzinfo
    tiers: tuple[Tier, ...]
    high_water: float = -math.inf  # the latest `now` seen; admissions are never evaluated earlier


def effective_now(state: LimiterState, now: float) -> float:
    """The instant the limiter evaluates `now` at: never earlier than one already seen."""
    return max(now, state.high_water)


@attrs.frozen
class Charge:
    """One counter increment the store must persist (negative for a refund)."""

    period: Period
    bucket: int
    units: int


@attrs.frozen
class Reservation:
    """What one admitted unit was charged: the instant (after the high-water clamp) and the
    bucket per tier. Hand it back to `refund` as is; it never needs the clock again."""

    at: float
    units: int
    charges: tuple[Charge, ...]  # one per tier that was on: (period, bucket, units)


@attrs.frozen
class Decision:
    requested: int
    admitted: int
    charges: tuple[Charge, ...] = ()
    retry_at: float | None = None  # when a unit may fit again, if not all were admitted
    exhausted: tuple[Period, ...] = ()  # tiers with no room left after this decision
    reservations: tuple[Reservation, ...] = ()  # one per admitted unit, in order
    at: float | None = None  # the instant this decision was evaluated at (effective time)


@attrs.frozen
class TierUsage:
    period: Period
    used: int
    limit: int
    remaining: int
    resets_at: float | None  # rolling: when the oldest counted unit expires; fixed: period end


def new_state(
    limits: Mapping[Period, int], *, strategy: Strategy = Strategy.ROLLING, tz: tzinfo
) -> LimiterState:
    """A limiter for the tiers whose limit is > 0 (0 means off)."""
    tiers = tuple(Tier(p, int(limits[p])) for p in Period if limits.get(p, 0) > 0)
    return LimiterState(strategy, tz, tiers)


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
    """Earliest time at which `need` more units fit in every tier (no other admissions)."""
    t = effective_now(state, now)
    return max((_free_at(state, tier, t, need) for tier in state.tiers), default=t)


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
        out.append(TierUsage(tier.period, used, tier.limit, max(0, tier.limit - used), resets))
    return out


def _prune(state: LimiterState, tier: Tier, now: float) -> dict[int, int]:
    """Drop buckets that can never count again (effective time never moves back)."""
    if state.strategy is Strategy.FIXED:
        start = bucket_of(state.strategy, state.tz, tier.period, now)
        return {b: n for b, n in tier.buckets.items() if b >= start}
    g, w = GRANULARITY[tier.period], ROLLING_WINDOW[tier.period]
    return {b: n for b, n in tier.buckets.items() if now < b + g + w + SLACK}


def admit(state: LimiterState, now: float, n: int) -> tuple[LimiterState, Decision]:
    """Reserve up to `n` units at time `now` (evaluated at `effective_now(state, now)`)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    t = effective_now(state, now)
    if not state.tiers:
        return attrs.evolve(state, high_water=t), Decision(n, n, reservations=(Reservation(t, 1, ()),) * n, at=t)
    room = min(tier.limit - _used(state, tier, t) for tier in state.tiers)
    k = max(0, min(n, room))
    new_tiers = []
    charges = []
    for tier in state.tiers:
        buckets = _prune(state, tier, t)
        if k:
            key = bucket_of(state.strategy, state.tz, tier.period, t)
            buckets[key] = buckets.get(key, 0) + k
            charges.append(Charge(tier.period, key, k))
        new_tiers.append(attrs.evolve(tier, buckets=buckets))
    new_state = attrs.evolve(state, tiers=tuple(new_tiers), high_water=t)
    exhausted = tuple(tier.period for tier in new_state.tiers if _used(new_state, tier, t) >= tier.limit)
    retry_at = next_free_at(new_state, t) if k < n else None
    one = Reservation(t, 1, tuple(Charge(c.period, c.bucket, 1) for c in charges))
    return new_state, Decision(n, k, tuple(charges), retry_at, exhausted, (one,) * k, t)


def reservation_at(state: LimiterState, at: float, units: int = 1) -> Reservation:
    """The reservation an admission evaluated at `at` made (to refund from a stored instant:
    `Reservation.at` is exact, so its buckets are the ones charged while the strategy and
    time zone are unchanged)."""
    return Reservation(at, units, tuple(Charge(t.period, bucket_of(state.strategy, state.tz, t.period, at), units) for t in state.tiers))


def merge(reservations: Iterable[Reservation]) -> dict[tuple[Period, int], int]:
    """Units per (tier, bucket) held by these reservations together."""
    out: dict[tuple[Period, int], int] = {}
    for r in reservations:
        for c in r.charges:
            out[(c.period, c.bucket)] = out.get((c.period, c.bucket), 0) + c.units
    return out


def refund(state: LimiterState, reservations: Iterable[Reservation]) -> tuple[LimiterState, tuple[Charge, ...]]:
    """Give back what these reservations were charged, to the buckets they were charged to
    (never below zero; a bucket already pruned has nothing left to give back)."""
    wanted = merge(reservations)
    new_tiers = []
    charges = []
    for tier in state.tiers:
        buckets = dict(tier.buckets)
        for (period, key), n in sorted(wanted.items(), key=lambda kv: (kv[0][0].value, kv[0][1])):
            if period is not tier.period or n <= 0:
                continue
            have = buckets.get(key, 0)
            back = min(have, n)
            if back:
                if have - back:
                    buckets[key] = have - back
                else:
                    del buckets[key]
                charges.append(Charge(tier.period, key, -back))
        new_tiers.append(attrs.evolve(tier, buckets=buckets))
    return attrs.evolve(state, tiers=tuple(new_tiers)), tuple(charges)


def with_counts(
    state: LimiterState, rows: Iterable[tuple[Period, int, int]], *, high_water: float | None = None
) -> LimiterState:
    """Load persisted counters (period, bucket, units) into a fresh state.

    Rows for tiers that are now off are ignored; a limit changed between runs applies to
    the counts already used. The high-water mark is the stored one, and never earlier than
    the latest bucket loaded (a store written before the mark existed).
    """
    by_period: dict[Period, dict[int, int]] = {t.period: dict(t.buckets) for t in state.tiers}
    hw = state.high_water if high_water is None else max(state.high_water, high_water)
    for period, bucket, units in rows:
        if units > 0:
            hw = max(hw, float(bucket))
        if period in by_period and units > 0:
            by_period[period][bucket] = by_period[period].get(bucket, 0) + units
    return attrs.evolve(
        state, tiers=tuple(attrs.evolve(t, buckets=by_period[t.period]) for t in state.tiers), high_water=hw
    )


def prune_before(state: LimiterState, period: Period, now: float) -> int:
    """Bucket keys below this value can be deleted from storage."""
    now = effective_now(state, now)
    if state.strategy is Strategy.FIXED:
        return bucket_of(state.strategy, state.tz, period, now)
    return math.floor(now - ROLLING_WINDOW[period] - GRANULARITY[period] - SLACK)


def convert_rows(
    rows: Iterable[tuple[Period, int, int]],
    *,
    from_strategy: Strategy,
    from_tz: tzinfo,
    to_state: LimiterState,
    now: float,
) -> list[tuple[Period, int, int]]:
    """Re-key stored counters after RATE_LIMIT_STRATEGY or the time zone changed.

    Each old bucket's units are assumed to have been reserved as late as the bucket allows
    (never after `now`): the conversion can only make the limiter stricter.
    """
    out: dict[tuple[Period, int], int] = {}
    for period, bucket, units in rows:
        if from_strategy is Strategy.FIXED:
            latest = calendar_period(period, bucket, from_tz)[1] - 1
        else:
            latest = bucket + GRANULARITY[period] - 1
        t = min(now, latest)
        key = (period, bucket_of(to_state.strategy, to_state.tz, period, t))
        out[key] = out.get(key, 0) + units
    return [(p, b, u) for (p, b), u in out.items()]
