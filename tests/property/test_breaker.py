"""The breaker's transition table holds for any sequence of outcomes and clock advances."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from processor.pure import breaker as br
from processor.pure.breaker import Outcome, State


class BreakerMachine(RuleBasedStateMachine):
    @initialize(
        threshold=st.integers(1, 6), base_wait=st.floats(0.5, 10), probes=st.integers(1, 3),
        window=st.sampled_from([0, 5, 10]), rate=st.floats(0.2, 1.0),
    )
    def setup(self, threshold, base_wait, probes, window, rate):
        self.cfg = br.BreakerConfig(threshold=threshold, base_wait=base_wait, max_wait=60, probes=probes, window=window, rate_threshold=rate, min_calls=5)
        self.b = br.Breaker()
        self.now = 0.0
        self.consecutive = 0
        self.in_flight = 0  # calls allowed and not yet recorded

    @rule(dt=st.floats(0, 30))
    def advance(self, dt):
        self.now += dt

    @rule()
    def allow(self):
        before = self.b
        self.b, ok = br.allow(self.cfg, self.b, self.now)
        if before.state is State.CLOSED:
            assert ok
        elif before.state is State.OPEN:
            waited = self.now >= before.opened_at + br.open_wait(self.cfg, before.reopens)
            assert ok == waited  # an open breaker admits nothing until its wait has passed
            if ok:
                assert self.b.state is State.HALF_OPEN
        else:
            assert ok == (before.probes_in_flight < self.cfg.probes)
        if ok:
            self.in_flight += 1

    @rule(outcome=st.sampled_from(list(Outcome)))
    def record(self, outcome):
        before = self.b
        self.b = br.record(self.cfg, self.b, self.now, outcome)
        if before.state is State.CLOSED:
            if outcome is Outcome.FAILURE:
                self.consecutive += 1
                if self.consecutive >= self.cfg.threshold:
                    assert self.b.state is State.OPEN and self.b.opened_at == self.now
            elif outcome is Outcome.SUCCESS:
                self.consecutive = 0
                assert self.b.state is State.CLOSED
            else:
                assert self.b == before  # 4xx: never a failure, never a reset
        elif before.state is State.HALF_OPEN:
            if outcome is Outcome.FAILURE:
                assert self.b.state is State.OPEN and self.b.reopens == before.reopens + 1
            else:
                assert self.b.state is State.CLOSED and self.b.reopens == 0
        else:
            assert self.b == before
        if self.b.state is not State.CLOSED or before.state is not State.CLOSED:
            self.consecutive = self.b.failures

    @invariant()
    def half_open_probe_budget(self):
        if hasattr(self, "b") and self.b.state is State.HALF_OPEN:
            assert 1 <= self.b.probes_in_flight <= self.cfg.probes

    @invariant()
    def wait_grows_and_is_capped(self):
        if hasattr(self, "b"):
            w = br.open_wait(self.cfg, self.b.reopens)
            assert self.cfg.base_wait <= w <= max(self.cfg.max_wait, self.cfg.base_wait) or w == self.cfg.max_wait
            assert br.open_wait(self.cfg, self.b.reopens + 1) >= w


BreakerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestBreaker = BreakerMachine.TestCase


def test_failure_rate_rule_opens_without_consecutive_failures():
    cfg = br.BreakerConfig(threshold=100, window=10, rate_threshold=0.5, min_calls=10)
    b = br.Breaker()
    for i in range(10):
        b = br.record(cfg, b, float(i), Outcome.FAILURE if i % 2 else Outcome.SUCCESS)
    assert b.state is State.OPEN


def test_trip_opens_at_once():
    b = br.trip(br.Breaker(), 5.0)
    assert b.state is State.OPEN and br.retry_at(br.BreakerConfig(base_wait=2), b) == 7.0
