"""Carry out `processor.pure.adaptive` for one (backend, model): request slots, sizes and
timeouts that follow the backend's measured speed.

    limiter = limits.get(backend, model)
    async with limiter.slot() as slot:              # waits while max_in_flight are out
        chunk, rest = slot.take(tasks, size=lambda t: len(t.text))
        timeout = slot.start(len(chunk), sum(len(t.text) for t in chunk))
        result = await adapter.embed(model, texts, timeout=timeout)
    # leaving the block records the outcome: success when it ends normally; a raised
    # error is classified (timeout / busy / other, see `classify`); cancellation records
    # nothing. `slot.record(Outcome...)` inside the block overrides that.

Only the backend call belongs inside the slot: back-off sleeps, outbox writes and reports
happen outside it, or they would hold a request slot without a request (and a split's
halves would wait for the slot their parent still holds).

Without `async with`: `slot = await limiter.acquire()` returns a slot already granted
(size the request from it at the moment it may go out), and `slot.finish(exc)` records
the outcome and gives the slot back; `finish` is idempotent, so a caller can hand a held
slot on and still `finish()` it in a `finally` for the case nobody used it.

The number of slots is a `trio.CapacityLimiter` whose size is set from the controller's
decision whenever it changes (when it shrinks, requests already out finish; no new one
starts until the count is under the new size). Each `slot()` takes a token on behalf of
its own object, so one task may hold several slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import trio

from processor.effects.logs import get_logger
from processor.pure import adaptive as ad
from processor.pure import batching

T = TypeVar("T")

BUSY_STATUSES = frozenset({429, 503})
MAX_LIMITERS = 256  # (backend, model) pairs remembered; models come from tasks


def classify(exc: BaseException) -> ad.Outcome | None:
    """What a failed backend call says about its speed. None: nothing (cancelled).

    Works on the adapters' errors by their kind (`fault` or `kind`, by value) and status:
    a timeout is TIMEOUT; busy, rate limited, 429 and 503 are BUSY; anything else ERROR.
    """
    if not isinstance(exc, Exception):
        return None
    kind = getattr(exc, "fault", None) or getattr(exc, "kind", None)
    value = getattr(kind, "value", kind)
    if value == "timeout":
        return ad.Outcome.TIMEOUT
    if value in ("busy", "rate_limited") or getattr(exc, "status", None) in BUSY_STATUSES:
        return ad.Outcome.BUSY
    return ad.Outcome.ERROR


class Slot:
    """One request's permission to go out, with the limits in force when it was granted."""

    def __init__(self, limiter: AdaptiveLimiter) -> None:
        self._limiter = limiter
        self._token = object()
        self.decision = limiter.plan()
        self.items = 0
        self.chars = 0
        self.started_at: float | None = None
        self.outcome: ad.Outcome | None = None
        self.timeout: float | None = None
        self._held = False

    @property
    def max_items(self) -> int:
        return self.decision.max_items

    @property
    def max_chars(self) -> float:
        return self.decision.max_chars

    def take(self, items: Sequence[T], *, size: Callable[[T], int]) -> tuple[list[T], list[T]]:
        """The first request's worth of `items` (at least one) and the rest."""
        if not items:
            return [], []
        first = batching.chunk(items, max_items=self.max_items, max_weight=self.max_chars, weight=lambda x: float(size(x)))[0]
        return first, list(items[len(first):])

    def start(self, items: int, chars: int) -> float:
        """The request of `items` texts of `chars` characters goes out now: its timeout."""
        self.items, self.chars = items, chars
        self.started_at = self._limiter.clock()
        self.timeout = self._limiter.timeout_for(items, chars)
        return self.timeout

    def record(self, outcome: ad.Outcome) -> None:
        """Say how the request ended (otherwise leaving the block decides)."""
        self.outcome = outcome

    def record_error(self, exc: BaseException) -> None:
        """The call raised `exc` and the caller caught it inside the block."""
        outcome = classify(exc)
        if outcome is not None:
            self.outcome = outcome

    @property
    def held(self) -> bool:
        """Granted and not finished yet."""
        return self._held

    @property
    def used(self) -> bool:
        """A request went out under this slot (`start` was called)."""
        return self.started_at is not None

    async def _enter(self) -> None:
        await self._limiter._acquire(self._token)
        self._held = True
        self.decision = self._limiter.plan()  # fresh: it may have changed while waiting

    def finish(self, exc: BaseException | None = None) -> None:
        """Record how the request ended (`exc`: what it raised, None: it succeeded) and give
        the slot back. Only the first call counts; a slot never `start`ed records nothing."""
        if not self._held:
            return
        self._held = False
        try:
            if self.started_at is not None:
                outcome = self.outcome
                if outcome is None:
                    outcome = ad.Outcome.SUCCESS if exc is None else classify(exc)
                if outcome is not None:
                    self._limiter.record(self.items, self.chars, outcome, self._limiter.clock() - self.started_at)
        finally:
            self._limiter._release(self._token)

    async def __aenter__(self) -> Slot:
        await self._enter()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(exc)


class AdaptiveLimiter:
    """Slots, sizes and timeouts for one (backend, model)."""

    def __init__(self, cfg: ad.Config, *, name: str = "", clock: Callable[[], float] = trio.current_time,
                 extra_time: float = 0.0) -> None:
        self.cfg = cfg
        self.name = name
        self.extra_time = extra_time  # seconds a call may take beyond its timeout (e.g. Ollama pulling the model)
        self.clock = clock
        self.state = ad.initial(cfg)
        self._slots = trio.CapacityLimiter(1)
        self._last: ad.Decision | None = None
        self._log = get_logger("adaptive").bind(target=name)

    # -- decisions -------------------------------------------------------------------
    def plan(self) -> ad.Decision:
        decision = ad.decide(self.cfg, self.state, self.clock())
        if decision.max_in_flight != self._slots.total_tokens:
            self._slots.total_tokens = decision.max_in_flight
        if self._last is None or (decision.max_items, decision.max_in_flight) != (self._last.max_items, self._last.max_in_flight):
            if self._last is not None:
                self._log.info(
                    "adaptive_limits", max_items=decision.max_items, max_in_flight=decision.max_in_flight,
                    measured=decision.measured, rate=None if self.state.rate is None else round(self.state.rate, 1),
                )
            self._last = decision
        return decision

    def timeout_for(self, items: int, chars: int) -> float:
        return ad.timeout_for(self.cfg, self.state, items, chars, self.clock())

    def expected_seconds(self, items: int, chars: int) -> float | None:
        return ad.expected_seconds(self.cfg, self.state, items, chars)

    def items_per_second(self) -> float | None:
        return ad.items_per_second(self.cfg, self.state)

    def record(self, items: int, chars: int, outcome: ad.Outcome, elapsed: float) -> None:
        """Fold one request's outcome in (the slot does this; for calls made without one)."""
        self.state = ad.observe(self.cfg, self.state, ad.Observation(items, chars, outcome, elapsed, self.clock()))
        if outcome is ad.Outcome.TIMEOUT:
            self._log.warning("adaptive_timeout", items=items, chars=chars, elapsed=round(elapsed, 3),
                              next_timeout=round(self.timeout_for(items, chars), 3))
        self.plan()

    # -- slots -------------------------------------------------------------------------
    def slot(self) -> Slot:
        return Slot(self)

    async def acquire(self) -> Slot:
        """Wait for a slot and return it granted (cancellable: then nothing is held).
        The caller must `finish()` it."""
        slot = Slot(self)
        await slot._enter()
        return slot

    @property
    def in_flight(self) -> int:
        return self._slots.borrowed_tokens

    async def _acquire(self, token: object) -> None:
        self.plan()  # a stale state drops to one in flight before anyone else goes
        await self._slots.acquire_on_behalf_of(token)

    def _release(self, token: object) -> None:
        self._slots.release_on_behalf_of(token)

    def snapshot(self) -> dict[str, Any]:
        """For /health and logs: what was measured and what is allowed now."""
        d = self.plan()
        s = self.state
        return {
            "max_items": d.max_items,
            "max_in_flight": d.max_in_flight,
            "in_flight": self.in_flight,
            "measured": d.measured,
            "chars_per_second": None if s.rate is None else round(s.rate, 1),
            "items_per_second": None if (ips := self.items_per_second()) is None else round(ips, 2),
            "timeouts": s.timeouts,
            "busy": s.busy,
        }


class AdaptiveLimits:
    """One `AdaptiveLimiter` per (backend, model), made on first use.

    `timeouts` maps a backend to its configured timeout (the cap, and the timeout while the
    speed is unknown); `default_timeout` serves backends not in it. `extra_time` maps a
    backend to the seconds one of its calls may legitimately take beyond its timeout (an
    Ollama call may pull its model first: OLLAMA_MODEL_DOWNLOAD_TIMEOUT).
    """

    def __init__(
        self, *, max_items: int, max_in_flight: int, timeouts: Mapping[Hashable, float], default_timeout: float = 60.0,
        clock: Callable[[], float] = trio.current_time, extra_time: Mapping[Hashable, float] | None = None,
        **overrides: Any,
    ) -> None:
        self._extra_time = dict(extra_time or {})
        self._max_items = max_items
        self._max_in_flight = max_in_flight
        self._timeouts = dict(timeouts)
        self._default_timeout = default_timeout
        self._clock = clock
        self._overrides = overrides  # other `pure.adaptive.Config` fields (target, cold_items, ...)
        self._limiters: dict[tuple[Hashable, str], AdaptiveLimiter] = {}

    @classmethod
    def from_settings(cls, s: Any, **overrides: Any) -> AdaptiveLimits:
        from processor.pure.tasks import Backend

        return cls(
            max_items=s.max_batch_size, max_in_flight=s.concurrency_limit,
            timeouts={Backend.OLLAMA: s.ollama_timeout, Backend.OPENAI: s.openai_timeout, Backend.MOCK: s.openai_timeout},
            extra_time={Backend.OLLAMA: s.ollama_model_download_timeout}, **overrides,
        )

    def get(self, backend: Hashable, model: str, *, max_items: int | None = None) -> AdaptiveLimiter:
        """The limiter of (backend, model); `max_items` lowers the batch cap (the adapter's own
        limit) when it is the first use."""
        key = (backend, model)
        lim = self._limiters.pop(key, None)
        if lim is None:
            if len(self._limiters) >= MAX_LIMITERS:
                idle = next((k for k, v in self._limiters.items() if v.in_flight == 0), None)
                if idle is not None:
                    del self._limiters[idle]  # the least recently used one without a request out
            cap = self._timeouts.get(backend, self._default_timeout)
            if not (math.isfinite(cap) and cap > 0):
                cap = self._default_timeout
            cfg = ad.Config(
                max_items=max(1, min(self._max_items, max_items or self._max_items)), max_in_flight=self._max_in_flight,
                timeout_cap=cap, **self._overrides,
            )
            name = f"{getattr(backend, 'value', backend)}/{model}"
            extra = self._extra_time.get(backend, 0.0)
            lim = AdaptiveLimiter(cfg, name=name, clock=self._clock, extra_time=extra if math.isfinite(extra) and extra > 0 else 0.0)
        self._limiters[key] = lim  # (re)inserted last: the dict is in order of use
        return lim

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {lim.name: lim.snapshot() for lim in self._limiters.values()}
