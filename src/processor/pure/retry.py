"""Retry policy: error classification, backoff with full jitter, a retry budget."""

from __future__ import annotations

import enum

import attrs


class ErrorKind(enum.Enum):
    RETRYABLE = "retryable"  # connection errors, timeouts, 5xx, 408
    RATE_LIMITED = "rate_limited"  # 429 rate limit: pace (server may give a delay)
    AUTH = "auth"  # 401: refresh the token once, then retry once
    PERMANENT = "permanent"  # other 4xx, quota exhausted, invalid credentials


def classify_status(status: int, *, quota_exhausted: bool = False) -> ErrorKind:
    if status == 429:
        return ErrorKind.PERMANENT if quota_exhausted else ErrorKind.RATE_LIMITED
    if status == 401:
        return ErrorKind.AUTH
    if status == 408 or status >= 500:
        return ErrorKind.RETRYABLE
    return ErrorKind.PERMANENT


@attrs.frozen
class RetryPolicy:
    max_retries: int = 3
    base: float = 1.0
    factor: float = 2.0
    cap: float = 30.0
    deadline: float | None = None  # seconds for the whole operation, retries included
    max_retry_after: float = 120.0


@attrs.frozen
class Retry:
    delay: float


@attrs.frozen
class GiveUp:
    reason: str


def backoff(policy: RetryPolicy, attempt: int, draw: float) -> float:
    """Full jitter: uniform(0, min(cap, base * factor**attempt)); `draw` in [0, 1)."""
    try:
        ceiling = min(policy.cap, policy.base * policy.factor**attempt)
    except OverflowError:
        ceiling = policy.cap
    return max(0.0, min(1.0, draw)) * ceiling


def decide(
    policy: RetryPolicy,
    *,
    attempt: int,
    elapsed: float,
    kind: ErrorKind,
    draw: float,
    retry_after: float | None = None,
) -> Retry | GiveUp:
    """What to do after failed attempt number `attempt` (0-based)."""
    if kind is ErrorKind.PERMANENT:
        return GiveUp("permanent error")
    if attempt >= policy.max_retries:
        return GiveUp(f"gave up after {attempt + 1} attempts")
    if retry_after is not None and retry_after >= 0:
        if retry_after > policy.max_retry_after:
            return GiveUp(f"server asked to wait {retry_after:g}s, over the {policy.max_retry_after:g}s cap")
        delay = retry_after
    else:
        delay = backoff(policy, attempt, draw)
    if policy.deadline is not None and elapsed + delay > policy.deadline:
        return GiveUp(f"deadline of {policy.deadline:g}s would be exceeded")
    return Retry(delay)


@attrs.frozen
class RetryBudget:
    """Retries may be at most `ratio` of recent requests (plus a small reserve).

    Each request deposits `ratio` tokens, each retry spends one; the balance is capped so
    that a long quiet spell does not bank an unlimited storm.
    """

    ratio: float = 0.2
    cap: float = 20.0
    balance: float = 10.0


def on_request(b: RetryBudget) -> RetryBudget:
    return attrs.evolve(b, balance=min(b.cap, b.balance + b.ratio))


def try_spend(b: RetryBudget) -> tuple[RetryBudget, bool]:
    if b.balance >= 1.0:
        return attrs.evolve(b, balance=b.balance - 1.0), True
    return b, False
