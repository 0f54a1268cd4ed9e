"""The limiter, checked against a brute-force count of every reservation.

Real time only moves forward; the wall clock the limiter reads is real time plus an offset
that can step back at any moment, by any amount (NTP, a restored VM, a Redis failover).
For any interleaving of admissions, refunds, restarts (state rebuilt from what was
persisted), real-time advances and clock steps back (seconds to months, across DST
changes and period edges):

* no rolling window of *real* time ever holds more than its limit (exact rule);
* no calendar period of the limiter's effective time holds more than its limit, and no
  stretch of real time as long as the shortest such period holds more than twice it (the
  fixed-window edge; a clock stepping back across an edge used to give three times);
* every admission equals what the documented bucket rule allows at the effective time (so
  no under-use beyond bucket rounding);
* a refund gives back exactly the buckets its reservation was charged to;
* a state rebuilt from the persisted charges and high-water mark equals the one in memory.
"""

from __future__ import annotations

import math
from datetime import datetime
from zoneinfo import ZoneInfo

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from processor.pure import ratelimit as rl

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"]
STEPS = [0.2, 1, 59, 60, 61, 599, 3599, 3600, 3601, 86399, 86400, 86401, 7 * 86400, 30 * 86400, 31 * 86400]
# Near DST changes: 2026-03-29 (EU spring), 2026-10-25 (EU fall), 2026-03-08 / 2026-11-01 (US).
STARTS = [datetime(2026, 3, 29, 0, 30, tzinfo=ZoneInfo("UTC")).timestamp(),
          datetime(2026, 10, 24, 23, 59, tzinfo=ZoneInfo("UTC")).timestamp(),
          datetime(2026, 3, 8, 6, 0, tzinfo=ZoneInfo("UTC")).timestamp(),
          datetime(2026, 10, 31, 23, 0, tzinfo=ZoneInfo("UTC")).timestamp(),
          datetime(2028, 2, 28, 23, 59, 59, tzinfo=ZoneInfo("UTC")).timestamp(),
          datetime(2026, 12, 31, 23, 59, 59, tzinfo=ZoneInfo("UTC")).timestamp()]
# The shortest calendar period of each kind (a DST day has 23 hours; a February 28 days).
SHORTEST = {rl.Period.MINUTE: 60, rl.Period.HOUR: 3_600, rl.Period.DAY: 23 * 3_600,
            rl.Period.WEEK: 7 * 86_400 - 3_600, rl.Period.MONTH: 28 * 86_400 - 3_600}


def exact_count(strategy, tz, period, reservations, now):
    """Units counted at effective time `now` by the exact rule; reservations are (time, units)."""
    if strategy is rl.Strategy.FIXED:
        start, end = rl.calendar_period(period, now, tz)
        return sum(n for t, n in reservations if start <= t < end)
    w = rl.ROLLING_WINDOW[period]
    return sum(n for t, n in reservations if now - w < t <= now)


def bucket_count(strategy, tz, period, reservations, now):
    """The documented (conservative) rule, by brute force."""
    if strategy is rl.Strategy.FIXED:
        return exact_count(strategy, tz, period, reservations, now)
    g, w = rl.GRANULARITY[period], rl.ROLLING_WINDOW[period]
    return sum(n for t, n in reservations if t <= now and now < math.floor(t / g) * g + g + w + rl.SLACK)


class Unit:
    """One admitted unit: when it was admitted in real time, and its reservation."""

    def __init__(self, real: float, reservation: rl.Reservation) -> None:
        self.real = real
        self.reservation = reservation
        self.refunded: set[rl.Period] = set()  # tiers that gave this unit back
        self.returned = False  # a reservation is handed back at most once (the caller forgets it)


class LimiterMachine(RuleBasedStateMachine):
    @initialize(
        strategy=st.sampled_from(list(rl.Strategy)),
        zone=st.sampled_from(ZONES),
        start=st.sampled_from(STARTS),
        limits=st.fixed_dictionaries({}, optional={p: st.integers(1, 8) for p in rl.Period}),
    )
    def setup(self, strategy, zone, start, limits):
        self.tz = ZoneInfo(zone)
        self.strategy = strategy
        self.limits = limits
        self.state = rl.new_state(limits, strategy=strategy, tz=self.tz)
        self.real = start
        self.offset = 0.0  # wall clock minus real time; only ever steps back
        self.units: list[Unit] = []
        self.persisted: dict[tuple[rl.Period, int], int] = {}
        self.persisted_high_water: float | None = None

    @property
    def wall(self) -> float:
        return self.real + self.offset

    def _persist(self, charges, high_water=None):
        for c in charges:
            key = (c.metric, c.period, c.bucket)
            self.persisted[key] = self.persisted.get(key, 0) + c.units
            if self.persisted[key] <= 0:
                del self.persisted[key]
        if high_water is not None:  # as the shell does: the mark is stored whenever it moves
            self.persisted_high_water = high_water if self.persisted_high_water is None else max(self.persisted_high_water, high_water)

    def _effective(self, period):
        return [(u.reservation.at, 1) for u in self._live(period)]

    def _live(self, period):
        return [u for u in self.units if period not in u.refunded]

    @rule(step=st.sampled_from(STEPS) | st.floats(0, 5000))
    def advance(self, step):
        self.real += step

    @rule(back=st.sampled_from([0.3, 0.6, 1, 59, 60, 61, 3600, 86400, 31 * 86400]) | st.floats(0, 90_000))
    def clock_steps_back(self, back):
        self.offset -= back

    @rule(n=st.integers(0, 10))
    def admit(self, n):
        e = rl.effective_now(self.state, self.wall)
        assert e >= self.wall
        expected_room = min(
            (lim - bucket_count(self.strategy, self.tz, p, self._effective(p), e) for p, lim in self.limits.items()),
            default=n,
        )
        self.state, d = rl.admit(self.state, self.wall, n)
        assert d.at == e and self.state.high_water == e
        assert d.admitted == max(0, min(n, expected_room)), (d, expected_room)
        assert len(d.reservations) == n and d.admitted == sum(1 for r in d.reservations if r is not None)
        assert d.admitted_indexes() == list(range(d.admitted))  # task counts only: a prefix
        if d.admitted < n and self.limits:
            # retry_at is exactly when one more unit fits (given no other admissions)
            assert d.retry_at is not None and d.retry_at > e
            assert rl.admit(self.state, d.retry_at, 1)[1].admitted == 1
            assert rl.admit(self.state, d.retry_at - 0.001, 1)[1].admitted == 0
        for r in d.reservations[: d.admitted]:
            assert r is not None and r.at == e and r.units == 1
            assert {(c.period, c.bucket) for c in r.charges} == {
                (p, rl.bucket_of(self.strategy, self.tz, p, e)) for p in self.limits
            }
            self.units.append(Unit(self.real, r))
        self._persist(d.charges, self.state.high_water)

    @precondition(lambda self: any(not u.returned for u in getattr(self, "units", [])))
    @rule(data=st.data())
    def refund(self, data):
        open_ = [i for i, u in enumerate(self.units) if not u.returned]
        picked = data.draw(st.lists(st.sampled_from(open_), min_size=1, max_size=4, unique=True))
        for i in picked:
            self.units[i].returned = True
        before = {(t.metric, t.period): dict(t.buckets) for t in self.state.tiers}
        self.state, charges = rl.refund(self.state, [self.units[i].reservation for i in picked])
        # exactly the charged buckets, at most what they still hold
        wanted = rl.merge(self.units[i].reservation for i in picked)
        for c in charges:
            assert c.units < 0 and -c.units == min(before[(c.metric, c.period)].get(c.bucket, 0), wanted[(c.metric, c.period, c.bucket)])
        # Units in the same bucket are interchangeable; per tier, the brute-force list gives
        # back the picked units whose bucket is still tracked (a pruned one counts nowhere).
        given = {(c.period, c.bucket): -c.units for c in charges}
        for i in picked:
            u = self.units[i]
            for c in u.reservation.charges:
                if c.period not in u.refunded and given.get((c.period, c.bucket), 0) > 0:
                    given[(c.period, c.bucket)] -= 1
                    u.refunded.add(c.period)
        assert not any(given.values())
        self._persist(charges)

    @rule()
    def restart(self):
        rows = [(m, p, b, n) for (m, p, b), n in self.persisted.items()]
        self.state = rl.with_counts(rl.new_state(self.limits, strategy=self.strategy, tz=self.tz), rows,
                                    high_water=self.persisted_high_water)

    @invariant()
    def no_real_window_over_a_rolling_limit(self):
        if not hasattr(self, "state") or self.strategy is not rl.Strategy.ROLLING:
            return
        for p, lim in self.limits.items():
            w = rl.ROLLING_WINDOW[p]
            assert sum(1 for u in self._live(p) if self.real - w < u.real <= self.real) <= lim

    @invariant()
    def fixed_periods_hold_and_real_stretches_at_most_twice(self):
        if not hasattr(self, "state") or self.strategy is not rl.Strategy.FIXED:
            return
        for p, lim in self.limits.items():
            for u in self._live(p):
                assert exact_count(self.strategy, self.tz, p, self._effective(p), u.reservation.at) <= lim
            assert sum(1 for u in self._live(p) if self.real - SHORTEST[p] < u.real <= self.real) <= 2 * lim

    @invariant()
    def usage_matches_brute_force(self):
        if not hasattr(self, "state"):
            return
        e = rl.effective_now(self.state, self.wall)
        for u in rl.usage(self.state, self.wall):
            assert u.used == bucket_count(self.strategy, self.tz, u.period, self._effective(u.period), e)
            assert u.remaining == max(0, u.limit - u.used)

    @invariant()
    def reload_equals_memory(self):
        if not hasattr(self, "state"):
            return
        rows = [(m, p, b, n) for (m, p, b), n in self.persisted.items()]
        loaded = rl.with_counts(rl.new_state(self.limits, strategy=self.strategy, tz=self.tz), rows,
                                high_water=self.persisted_high_water)
        # The loaded mark is the one in memory: after a restart no admission is evaluated
        # earlier than one already made.
        assert loaded.high_water == self.state.high_water or not self.limits
        assert all(u.reservation.at <= loaded.high_water for u in self.units if u.reservation.charges)
        t = rl.effective_now(self.state, self.wall)
        assert rl.usage(loaded, t) == rl.usage(self.state, t)


LimiterMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestLimiter = LimiterMachine.TestCase


def ts(zone, *args):
    return datetime(*args, tzinfo=ZoneInfo(zone)).timestamp()


def test_calendar_edges():
    utc = ZoneInfo("UTC")
    # last second of a month
    s, e = rl.calendar_period(rl.Period.MONTH, ts("UTC", 2026, 1, 31, 23, 59, 59), utc)
    assert (s, e) == (ts("UTC", 2026, 1, 1), ts("UTC", 2026, 2, 1))
    # 29 February (leap year 2028)
    s, e = rl.calendar_period(rl.Period.DAY, ts("UTC", 2028, 2, 29, 12), utc)
    assert e - s == 86400 and s == ts("UTC", 2028, 2, 29)
    s, e = rl.calendar_period(rl.Period.MONTH, ts("UTC", 2028, 2, 29, 12), utc)
    assert e - s == 29 * 86400
    # ISO week starts Monday 00:00
    s, _ = rl.calendar_period(rl.Period.WEEK, ts("UTC", 2026, 11, 28, 10), utc)  # a Saturday
    assert datetime.fromtimestamp(s, utc).weekday() == 0 and s == ts("UTC", 2026, 11, 23)


def test_dst_days_have_23_and_25_hours():
    for zone, spring, fall in (("Europe/Berlin", (2026, 3, 29), (2026, 10, 25)), ("America/New_York", (2026, 3, 8), (2026, 11, 1))):
        tz = ZoneInfo(zone)
        s, e = rl.calendar_period(rl.Period.DAY, ts(zone, *spring, 12), tz)
        assert e - s == 23 * 3600 and s == ts(zone, *spring)
        s, e = rl.calendar_period(rl.Period.DAY, ts(zone, *fall, 12), tz)
        assert e - s == 25 * 3600
        # the repeated hour at fall-back: both occurrences are their own 3,600 s hour
        first = datetime(*fall, 1, 30, tzinfo=tz, fold=0).timestamp()
        second = datetime(*fall, 1, 30, tzinfo=tz, fold=1).timestamp()
        if zone == "America/New_York":
            a, b = rl.calendar_period(rl.Period.HOUR, first, tz), rl.calendar_period(rl.Period.HOUR, second, tz)
            assert a != b and a[1] - a[0] == b[1] - b[0] == 3600


def test_fixed_minute_resets_at_the_boundary_and_rolling_does_not():
    utc = ZoneInfo("UTC")
    t = ts("UTC", 2026, 5, 1, 12, 0, 30)
    fixed = rl.new_state({rl.Period.MINUTE: 3}, strategy=rl.Strategy.FIXED, tz=utc)
    fixed, d = rl.admit(fixed, t, 5)
    assert d.admitted == 3 and d.retry_at == ts("UTC", 2026, 5, 1, 12, 1, 0)
    fixed, d = rl.admit(fixed, ts("UTC", 2026, 5, 1, 12, 1, 0), 5)
    assert d.admitted == 3
    rolling = rl.new_state({rl.Period.MINUTE: 3}, strategy=rl.Strategy.ROLLING, tz=utc)
    rolling, d = rl.admit(rolling, t, 5)
    assert d.admitted == 3 and d.retry_at == t + 62  # bucket of 1 s + 1 s slack: at most 2 s stricter
    rolling, d = rl.admit(rolling, t + 61.5, 1)
    assert d.admitted == 0
    rolling, d = rl.admit(rolling, t + 62, 1)
    assert d.admitted == 1


def test_conversion_between_strategies_is_never_looser():
    utc = ZoneInfo("UTC")
    t = ts("UTC", 2026, 5, 1, 12, 0, 30)
    rolling = rl.new_state({rl.Period.HOUR: 10}, strategy=rl.Strategy.ROLLING, tz=utc)
    rolling, d = rl.admit(rolling, t, 10)
    rows = [(c.metric, c.period, c.bucket, c.units) for c in d.charges]
    fixed = rl.new_state({rl.Period.HOUR: 10}, strategy=rl.Strategy.FIXED, tz=utc)
    converted = rl.with_counts(fixed, rl.convert_rows(rows, from_strategy=rl.Strategy.ROLLING, from_tz=utc, to_state=fixed, now=t + 5))
    assert rl.usage(converted, t + 5)[0].used == 10
