"""Circuit breaker: closed / open / half-open, as a transition table over outcomes and time.

Opens after `threshold` consecutive failures, or (optional) when the failure rate over the
last `window` calls reaches `rate_threshold`. Stays open for a wait that doubles on each
re-open (up to `max_wait`); then half-open lets `probes` calls through. A success in
half-open closes it; a failure re-opens it. IGNORED outcomes (a 4xx other than 408/429:
the dependency answered) never count as failures.
"""

from __future__ import annotations

import enum

import attrs


class State(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"


@attrs.frozen
class BreakerConfig:
    threshold: int = 5
    base_wait: float = 1.0
    max_wait: float = 60.0
    probes: int = 1
    window: int = 0  # 0: failure-rate rule off
    rate_threshold: float = 0.5
    min_calls: int = 10


@attrs.frozen
class Breaker:
    state: State = State.CLOSED
    failures: int = 0  # consecutive, while closed
    opened_at: float = 0.0
    reopens: int = 0  # consecutive re-opens without closing
    probes_in_flight: int = 0
    recent: tuple[bool, ...] = ()  # True = failure; last `window` calls while closed


def open_wait(cfg: BreakerConfig, reopens: int) -> float:
    return min(cfg.max_wait, cfg.base_wait * 2.0 ** min(reopens, 32))


def retry_at(cfg: BreakerConfig, b: Breaker) -> float | None:
    """When an open breaker lets a probe through (None unless open)."""
    return b.opened_at + open_wait(cfg, b.reopens) if b.state is State.OPEN else None


def allow(cfg: BreakerConfig, b: Breaker, now: float) -> tuple[Breaker, bool]:
    """May a call go through now? Counts a half-open probe if so."""
    if b.state is State.CLOSED:
        return b, True
    if b.state is State.OPEN:
        if now < b.opened_at + open_wait(cfg, b.reopens):
            return b, False
        return attrs.evolve(b, state=State.HALF_OPEN, probes_in_flight=1), True
    if b.probes_in_flight < cfg.probes:
        return attrs.evolve(b, probes_in_flight=b.probes_in_flight + 1), True
    return b, False


def _trips(cfg: BreakerConfig, failures: int, recent: tuple[bool, ...]) -> bool:
    if failures >= cfg.threshold:
        return True
    if cfg.window and len(recent) >= cfg.min_calls:
        return sum(recent) / len(recent) >= cfg.rate_threshold
    return False


def record(cfg: BreakerConfig, b: Breaker, now: float, outcome: Outcome) -> Breaker:
    """Fold one call's outcome into the breaker."""
    if b.state is State.OPEN:
        return b  # a late answer from before it opened changes nothing
    if b.state is State.HALF_OPEN:
        if outcome is Outcome.FAILURE:
            return Breaker(State.OPEN, 0, now, b.reopens + 1, 0, ())
        return Breaker()  # the dependency answered: close
    if outcome is Outcome.IGNORED:
        return b
    failed = outcome is Outcome.FAILURE
    if not failed and not b.failures and not cfg.window:
        return b  # the common case: nothing to change
    recent = (b.recent + (failed,))[-cfg.window :] if cfg.window else ()
    failures = b.failures + 1 if failed else 0
    if failed and _trips(cfg, failures, recent):
        return Breaker(State.OPEN, 0, now, 0, 0, ())
    return attrs.evolve(b, failures=failures, recent=recent)


def release_probe(b: Breaker) -> Breaker:
    """A probe slot was taken but no call was made (cancelled)."""
    if b.state is State.HALF_OPEN and b.probes_in_flight > 0:
        return attrs.evolve(b, probes_in_flight=b.probes_in_flight - 1)
    return b


def trip(b: Breaker, now: float) -> Breaker:
    """Open at once (a whole-dependency error such as a bad key or exhausted quota)."""
    return Breaker(State.OPEN, 0, now, b.reopens + (0 if b.state is State.CLOSED else 1), 0, ())
