"""What the stages know about their backends and about admission, each in one place.

`BackendBoard`: the adapters, their breakers and retry budgets, and what is known to be
wrong with them (a backend unusable until a probe works, out of credit, a model this
deployment cannot serve now). `Admission`: the limiters, the leases, and the pause the
claimer and the poller share. Task state is not here: it lives in the `Book`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio

from processor.effects.guard import Guard
from processor.effects.leases import Leases
from processor.effects.limiter import Limiter
from processor.effects.retrying import Budget
from processor.pure.tasks import Backend

MODEL_RECHECK = 60.0  # seconds before a model found unservable is tried again
UNSERVABLE_MAX = 10  # distinct model names remembered for /health and metrics (then "other")


class BackendBoard:
    def __init__(self, adapters: Mapping[Backend, Any], guards: Mapping[Backend, Guard]) -> None:
        self.adapters = dict(adapters)
        self.guards = dict(guards)
        self.budgets = {b: Budget() for b in guards}
        self.down: dict[Backend, str] = {}  # configuration / credentials / unreachable: until a probe works
        self.quota: dict[Backend, str] = {}  # out of credit
        self.unusable_models: dict[str, tuple[str, float]] = {}  # model -> (why, trio time)
        self.unservable: dict[str, str] = {}  # model -> why its tasks were left pending (bounded, for /health)
        self.last_success: dict[Backend, float] = {}  # trio time of each backend's last good answer

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
        self.paused_until = 0.0  # trio time; nothing is admitted (nor polled for) before it
        self.claim_failures = 0  # consecutive claim PATCHes that failed (back-off)

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, trio.current_time() + max(0.0, seconds))

    @property
    def paused(self) -> bool:
        return trio.current_time() < self.paused_until
