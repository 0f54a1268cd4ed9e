"""What the stages know about their backends and about admission, each in one place.

`BackendBoard`: the adapters, their breakers and retry budgets, their adaptive request
limits (sizes, requests in flight, timeouts from each backend's measured speed), and what
is known to be wrong with them (a backend unusable until a probe works, out of credit, a model this
deployment cannot serve now). `Admission`: the limiters, the leases, and the pause the
claimer and the poller share. Task state is not here: it lives in the `Book`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio

from processor.effects.adaptive import AdaptiveLimits
from processor.effects.guard import Guard
from processor.effects.leases import Leases
from processor.effects.limiter import Limiter
from processor.effects.retrying import Budget
from processor.pure.tasks import Backend

MODEL_RECHECK = 60.0  # seconds before a model found unservable is tried again
UNSERVABLE_MAX = 10  # distinct model names remembered for /health and metrics (then "other")
BUDGET_WHY = {
    "no_price": "no price for this model in MODEL_PRICES while a spend cap (SPEND_LIMIT_PER_*) is on: its tasks stay pending",
    "too_big": "a task of this model alone needs more than a token or spend tier's whole limit: it stays pending",
}


class BackendBoard:
    def __init__(self, adapters: Mapping[Backend, Any], guards: Mapping[Backend, Guard], *,
                 adaptive: AdaptiveLimits | None = None) -> None:
        self.adapters = dict(adapters)
        self.guards = dict(guards)
        self.budgets = {b: Budget() for b in guards}
        self.adaptive = adaptive  # per (backend, model) request limits; None: fixed sizes, no slots
        self.down: dict[Backend, str] = {}  # configuration / credentials / unreachable: until a probe works
        self.quota: dict[Backend, str] = {}  # out of credit
        self.unusable_models: dict[str, tuple[str, float]] = {}  # model -> (why, trio time)
        self.unservable: dict[str, str] = {}  # model -> why its tasks were left pending (bounded, for /health)
        self.last_success: dict[Backend, float] = {}  # trio time of each backend's last good answer
        # models whose tasks a token or spend budget leaves pending, and why, per reason
        # ("no_price", "too_big"; bounded like `unservable`, for /health and metrics)
        self.budget_refused: dict[str, dict[str, str]] = {}

    def model_unusable(self, model: str) -> str | None:
        """Why `model` is not served now (None: try it). A verdict lasts MODEL_RECHECK
        seconds, then one batch tries again (a model can be pulled, a server can come up)."""
        entry = self.unusable_models.get(model)
        if entry is None:
            return None
        if trio.current_time() - entry[1] >= MODEL_RECHECK:
            del self.unusable_models[model]
            return None
        return entry[0]

    def mark_unservable(self, model: str, why: str, *, retry_later: bool = True) -> str:
        """Remember why `model` is not served; returns its (bounded) label for metrics."""
        if retry_later:
            self.unusable_models[model] = (why[:300], trio.current_time())
        label = model[:100] if len(self.unservable) < UNSERVABLE_MAX or model[:100] in self.unservable else "other"
        self.unservable[label] = why[:300]
        return label

    def mark_budget_refused(self, model: str, reason: str) -> tuple[str, bool]:
        """Remember that a budget left tasks of `model` pending; returns its (bounded)
        label for metrics and whether it is new."""
        seen = self.budget_refused.setdefault(reason, {})
        label = model[:100] if len(seen) < UNSERVABLE_MAX or model[:100] in seen else "other"
        first = label not in seen
        if first:
            seen[label] = BUDGET_WHY.get(reason, reason)
        return label, first

    def succeeded(self, backend: Backend, model: str) -> bool:
        """A good answer: clears what was wrong. True when the backend was out of credit."""
        self.last_success[backend] = trio.current_time()
        self.down.pop(backend, None)
        self.unusable_models.pop(model, None)
        return self.quota.pop(backend, None) is not None


class Admission:
    def __init__(self, limiter: Limiter, openai_limiter: Limiter, leases: Leases) -> None:
        self.limiter = limiter
        self.openai_limiter = openai_limiter
        self.leases = leases
        self._paused_until = 0.0  # trio time; nothing is admitted (nor polled for) before it
        self._budget_paused_until = 0.0  # the same, for a token or spend budget without room
        self._wake = trio.Event()
        self.claim_failures = 0  # consecutive claim PATCHes that failed (back-off)

    def pause(self, seconds: float, *, budget: bool = False) -> None:
        """No admissions for `seconds`. A `budget` pause (a token or spend tier without room)
        ends early when a settlement frees room (`budget_freed`)."""
        until = trio.current_time() + max(0.0, seconds)
        if budget:
            self._budget_paused_until = max(self._budget_paused_until, until)
        else:
            self._paused_until = max(self._paused_until, until)

    @property
    def paused_until(self) -> float:
        return max(self._paused_until, self._budget_paused_until)

    @paused_until.setter
    def paused_until(self, value: float) -> None:
        self._paused_until = value

    def budget_freed(self) -> None:
        """A settlement gave room back: a budget pause ends now."""
        if self._budget_paused_until:
            self._budget_paused_until = 0.0
            self._wake.set()
            self._wake = trio.Event()

    async def sleep_while_paused(self, stopping: trio.Event) -> None:
        """Until the pause ends, `stopping` is set, or a settlement lifts a budget pause."""
        wake = self._wake
        with trio.move_on_at(self.paused_until):
            async with trio.open_nursery() as n:
                async def until(ev: trio.Event) -> None:
                    await ev.wait()
                    n.cancel_scope.cancel()

                n.start_soon(until, stopping)
                n.start_soon(until, wake)

    async def refund(self, limiter: str, reservations: list[Any]) -> None:
        """Give reserved units back to the limiter named by the book ("global" or OpenAI's)."""
        lim = self.limiter if limiter == "global" else self.openai_limiter
        await lim.refund(reservations)

    @property
    def paused(self) -> bool:
        return trio.current_time() < self.paused_until
