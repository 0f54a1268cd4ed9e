"""The one retry primitive, in stamina's shape: the loop body stays the caller's.

    async for attempt in retrying(name="report", on=retryable, attempts=8, timeout=300.0, budget=budget):
        with attempt:
            await api.patch(...)

* `on(exc)` says whether `exc` is worth another attempt: False (re-raise now), True
  (back off per the schedule) or a number of seconds the server asked for (`Retry-After`).
* Bounded by `attempts` and by `timeout` (seconds for the whole operation); when either is
  spent, or the budget refuses, the last exception is re-raised unchanged: what happens
  next is the caller's (and `processor.pure.policy`'s) business.
* `budget` (a `Budget`) is deposited into on every attempt and spent on every retry, in
  this one place. Paced waits (a server-given delay) do not spend it.
* Hooks (`add_hook`) see every retry (name, attempt, delay, exception): metrics and logs
  are hooks, not calls sprinkled in loops. `set_testing(True)` turns the waits off.
The schedule itself (full jitter, caps) is pure: `processor.pure.retry`.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from types import TracebackType

import attrs
import trio

from processor.pure import retry as schedule

_TESTING = False
_HOOKS: list[Callable[[str, int, float, BaseException], None]] = []


def set_testing(on: bool) -> None:
    """Tests: retries happen at once (no back-off sleeps)."""
    global _TESTING
    _TESTING = on


def add_hook(hook: Callable[[str, int, float, BaseException], None]) -> None:
    if hook not in _HOOKS:
        _HOOKS.append(hook)


def remove_hook(hook: Callable[[str, int, float, BaseException], None]) -> None:
    if hook in _HOOKS:
        _HOOKS.remove(hook)


class Budget:
    """Retries may be at most `ratio` of recent attempts (plus a small reserve)."""

    def __init__(self, *, ratio: float = 0.2, cap: float = 20.0, reserve: float = 10.0) -> None:
        self.state = schedule.RetryBudget(ratio=ratio, cap=cap, balance=reserve)

    def deposit(self) -> None:
        self.state = schedule.on_request(self.state)

    def spend(self) -> bool:
        self.state, ok = schedule.try_spend(self.state)
        return ok

    @property
    def balance(self) -> float:
        return self.state.balance


@attrs.define
class Attempt:
    """One try. As a context manager it swallows an exception that is worth retrying."""

    number: int  # 1-based
    _on: Callable[[BaseException], bool | float]
    _last: BaseException | None = None
    _asked: float | None = None

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        verdict = self._on(exc)
        if verdict is False:
            return False
        self._last = exc
        self._asked = None if verdict is True else float(verdict)
        return True


async def retrying(
    *,
    name: str,
    on: Callable[[BaseException], bool | float],
    attempts: int = 5,
    timeout: float | None = None,
    base: float = 0.5,
    factor: float = 2.0,
    cap: float = 30.0,
    budget: Budget | None = None,
    rng: random.Random | None = None,
) -> AsyncIterator[Attempt]:
    """Yield attempts until one succeeds (the caller breaks out) or the bounds are spent."""
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    policy = schedule.RetryPolicy(max_retries=attempts - 1, base=base, factor=factor, cap=cap, deadline=timeout)
    draw = (rng or random).random
    started = trio.current_time()
    for number in range(1, attempts + 1):
        if budget is not None:
            budget.deposit()
        attempt = Attempt(number, on)
        yield attempt
        exc = attempt._last
        if exc is None:
            return  # the body finished without a retryable error
        decision = schedule.decide(policy, attempt=number - 1, elapsed=trio.current_time() - started,
                                   kind=schedule.ErrorKind.RETRYABLE, draw=draw(), retry_after=attempt._asked)
        if isinstance(decision, schedule.GiveUp):
            raise exc
        if attempt._asked is None and budget is not None and not budget.spend():
            raise exc
        for hook in list(_HOOKS):
            hook(name, number, decision.delay, exc)
        if not _TESTING:
            await trio.sleep(decision.delay)
