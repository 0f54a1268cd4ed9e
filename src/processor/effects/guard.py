"""Carry out the pure breaker and retry decisions for one dependency.

A `Guard` owns one breaker's state and one retry budget. It is the only place that
mutates them; every decision is taken by `processor.pure.breaker` / `processor.pure.retry`.
"""

from __future__ import annotations

import random

import trio

from processor.effects.metrics import Metrics
from processor.pure import breaker as br
from processor.pure import retry as rt

PROBE_CLAIM_HOLD = 30.0  # seconds one probe group holds the claim slot of a recovering backend


class BreakerOpen(Exception):
    """The dependency's breaker is open; no call was made. `retry_at` is trio time."""

    def __init__(self, name: str, retry_at: float | None) -> None:
        super().__init__(f"{name}: circuit breaker open")
        self.retry_at = retry_at


class Guard:
    def __init__(
        self,
        name: str,
        cfg: br.BreakerConfig,
        *,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
        budget: rt.RetryBudget | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.state = br.Breaker()
        self.budget = budget or rt.RetryBudget()
        self.rng = rng or random.Random()
        self._metrics = metrics
        self._changed = trio.Event()
        self._probe_claimed_at: float | None = None
        self._publish()

    # -- breaker ---------------------------------------------------------------------
    def allow(self) -> bool:
        before = self.state.state
        self.state, ok = br.allow(self.cfg, self.state, trio.current_time())
        if self.state.state is not before:
            self._publish()
        return ok

    def check(self) -> None:
        if not self.allow():
            raise BreakerOpen(self.name, br.retry_at(self.cfg, self.state))

    def record(self, outcome: br.Outcome) -> None:
        before = self.state.state
        self.state = br.record(self.cfg, self.state, trio.current_time(), outcome)
        if self.state.state is not before:
            self._probe_claimed_at = None
            self._changed.set()
            self._changed = trio.Event()
            self._publish()

    def release_probe(self) -> None:
        self.state = br.release_probe(self.state)

    def force_open(self) -> None:
        """A whole-backend error (bad key, quota): open as if the threshold was reached."""
        self.state = br.trip(self.state, trio.current_time())
        self._probe_claimed_at = None
        self._changed.set()
        self._changed = trio.Event()
        self._publish()

    def claim_slot(self) -> bool:
        """May the intake claim work for this dependency now? Closed: yes. Open: not before
        the wait is over; then one group (the probe's) until the breaker closes or re-opens,
        so that a half-open backend is never fed more claims than it may be sent."""
        if self.state.state is br.State.CLOSED:
            self._probe_claimed_at = None
            return True
        now = trio.current_time()
        if self.blocked_until() is not None:
            return False
        if self._probe_claimed_at is not None and now - self._probe_claimed_at < PROBE_CLAIM_HOLD:
            return False  # the probe's group is on its way (or was let go: then again after a while)
        self._probe_claimed_at = now
        return True

    def blocked_until(self) -> float | None:
        """Trio time until which the breaker refuses every call (None: not refusing now)."""
        at = br.retry_at(self.cfg, self.state)
        return at if at is not None and trio.current_time() < at else None

    @property
    def is_open(self) -> bool:
        return self.state.state is br.State.OPEN

    async def wait_until_allowed(self) -> None:
        """Sleep until the breaker would let a call through (never spins)."""
        while self.state.state is br.State.OPEN:
            at = br.retry_at(self.cfg, self.state)
            if at is not None and trio.current_time() >= at:
                return
            with trio.move_on_at(at if at is not None else trio.current_time() + 1):
                await self._changed.wait()

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.breaker_state.labels(self.name).set(int(self.state.state))

    # -- retries -------------------------------------------------------------------------
    def note_request(self) -> None:
        self.budget = rt.on_request(self.budget)

    def may_retry(self) -> bool:
        self.budget, ok = rt.try_spend(self.budget)
        return ok

    def retry_decision(
        self, policy: rt.RetryPolicy, attempt: int, elapsed: float, kind: rt.ErrorKind, retry_after: float | None, reason: str
    ) -> rt.Retry | rt.GiveUp:
        decision = rt.decide(policy, attempt=attempt, elapsed=elapsed, kind=kind, draw=self.rng.random(), retry_after=retry_after)
        if isinstance(decision, rt.Retry):
            if kind is not rt.ErrorKind.RATE_LIMITED and not self.may_retry():
                return rt.GiveUp("retry budget exhausted")
            if self._metrics is not None:
                self._metrics.retries.labels(self.name, reason).inc()
        return decision

    def draw(self) -> float:
        return self.rng.random()


def outcome_for_status(status: int | None) -> br.Outcome:
    """Map an answer to a breaker outcome: 4xx other than 408/429 never count as failure."""
    if status is None:
        return br.Outcome.FAILURE
    if status == 429:
        return br.Outcome.IGNORED  # 429 paces instead of tripping
    if status == 408 or status >= 500:
        return br.Outcome.FAILURE
    if status >= 400:
        return br.Outcome.IGNORED
    return br.Outcome.SUCCESS
