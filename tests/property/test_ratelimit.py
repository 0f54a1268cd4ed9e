"""The limiter, checked against a brute-force count of every reservation.

For any interleaving of admissions, refunds and clock advances (seconds to months, across
DST changes), no window ever holds more than its limit (exact rule), every admission equals
what the documented bucket rule allows (so no under-use beyond bucket rounding), and a
state rebuilt from the persisted charges equals the one kept in memory.
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


def exact_count(strategy, tz, period, reservations, now):
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
        self.now = start
        self.reservations: list[list[float]] = []  # [time, units]
        self.persisted: dict[tuple[rl.Period, int], int] = {}

    def _persist(self, charges):
        for c in charges:
            key = (c.period, c.bucket)
            self.persisted[key] = self.persisted.get(key, 0) + c.units
            if self.persisted[key] <= 0:
                del self.persisted[key]

    @rule(step=st.sampled_from(STEPS) | st.floats(0, 5000))
    def advance(self, step):
        self.now += step

    @rule(n=st.integers(0, 10))
    def admit(self, n):
        expected_room = min(
            (lim - bucket_count(self.strategy, self.tz, p, self.reservations, self.now) for p, lim in self.limits.items()),
            default=n,
        )
        self.state, d = rl.admit(self.state, self.now, n)
        assert d.admitted == max(0, min(n, expected_room)), (d, expected_room)
        if d.admitted < n and self.limits:
            # retry_at is exactly when one more unit fits (given no other admissions)
            assert d.retry_at is not None and d.retry_at > self.now
            assert rl.admit(self.state, d.retry_at, 1)[1].admitted == 1
            assert rl.admit(self.state, d.retry_at - 0.001, 1)[1].admitted == 0
        if d.admitted:
            self.reservations.append([self.now, d.admitted])
        self._persist(d.charges)

    @precondition(lambda self: any(n > 0 for _, n in getattr(self, "reservations", [])))
    @rule(data=st.data())
    def refund(self, data):
        i = data.draw(st.sampled_from([j for j, (_, n) in enumerate(self.reservations) if n > 0]))
        t, have = self.reservations[i]
        n = data.draw(st.integers(1, int(have)))
        self.state, charges = rl.refund(self.state, t, n)
        # Units in the same bucket are interchangeable; the brute-force list gives them back
        # from this reservation, as the bucket does (only while the bucket is still tracked).
        if charges:
            back = -charges[0].units
            self.reservations[i][1] -= back
        self._persist(charges)

    @invariant()
    def never_over_a_limit(self):
        if not hasattr(self, "state"):
            return
        for p, lim in self.limits.items():
            assert exact_count(self.strategy, self.tz, p, self.reservations, self.now) <= lim

    @invariant()
    def usage_matches_brute_force(self):
        if not hasattr(self, "state"):
            return
        for u in rl.usage(self.state, self.now):
            assert u.used == bucket_count(self.strategy, self.tz, u.period, self.reservations, self.now)
            assert u.remaining == max(0, u.limit - u.used)

    @invariant()
    def reload_equals_memory(self):
        if not hasattr(self, "state"):
            return
        rows = [(p, b, n) for (p, b), n in self.persisted.items()]
        loaded = rl.with_counts(rl.new_state(self.limits, strategy=self.strategy, tz=self.tz), rows)
        assert rl.usage(loaded, self.now) == rl.usage(self.state, self.now)


LimiterMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
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
    rows = [(c.period, c.bucket, c.units) for c in d.charges]
    fixed = rl.new_state({rl.Period.HOUR: 10}, strategy=rl.Strategy.FIXED, tz=utc)
    converted = rl.with_counts(fixed, rl.convert_rows(rows, from_strategy=rl.Strategy.ROLLING, from_tz=utc, to_state=fixed, now=t + 5))
    assert rl.usage(converted, t + 5)[0].used == 10
