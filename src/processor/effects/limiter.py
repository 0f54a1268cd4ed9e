"""The rate limiter's shell: the pure decision, persisted before it counts.

`SqliteLimiter.admit(n)` decides with `processor.pure.ratelimit.admit`, writes the charges
in one transaction, and only then returns the decision; if the write fails, nothing is
admitted and the error is raised (work never goes through uncounted).
"""

from __future__ import annotations

import time
import zoneinfo
from collections.abc import Callable
from typing import Protocol

import trio

from processor.config import Limits, Settings
from processor.effects.logs import get_logger
from processor.effects.metrics import Metrics
from processor.effects.store import RateLimitStore
from processor.pure import ratelimit as rl


class Limiter(Protocol):
    name: str

    async def admit(self, n: int) -> rl.Decision: ...
    async def refund(self, reserved_at: float, n: int) -> None: ...
    def usage(self) -> list[rl.TierUsage]: ...
    def now(self) -> float: ...
    @property
    def healthy(self) -> tuple[bool, str | None]: ...


def limits_map(limits: Limits) -> dict[rl.Period, int]:
    return {rl.Period(k): v for k, v in limits.enabled().items()}


class TierWatch:
    """Logs a tier's exhaustion once when it happens and once when it frees (not per poll),
    and publishes usage gauges (for the global limiter only)."""

    def __init__(self, name: str, metrics: Metrics | None, **context: str) -> None:
        self._name = name
        self._metrics = metrics if name == "global" else None
        self._exhausted: set[rl.Period] = set()
        self._log = get_logger("ratelimit").bind(limiter=name, **context)

    def update(self, usage: list[rl.TierUsage], retry_at: float | None = None) -> None:
        exhausted = {u.period for u in usage if u.remaining <= 0}
        for p in exhausted - self._exhausted:
            self._log.warning("rate_limit_exhausted", period=p.value, retry_at=retry_at)
        for p in self._exhausted - exhausted:
            self._log.info("rate_limit_available", period=p.value)
        self._exhausted = exhausted
        if self._metrics is not None:
            for u in usage:
                self._metrics.rl_usage.labels(u.period.value).set(u.used)
                self._metrics.rl_max.labels(u.period.value).set(u.limit)
                self._metrics.rl_remaining.labels(u.period.value).set(u.remaining)


def format_usage(usage: list[rl.TierUsage]) -> list[str]:
    """The `limits` command's table."""
    from datetime import UTC, datetime

    lines = [f"{'period':<8} {'used':>10} {'limit':>10} {'remaining':>10}  resets at"]
    for u in usage:
        resets = datetime.fromtimestamp(u.resets_at, UTC).isoformat(timespec="seconds") if u.resets_at else "-"
        lines.append(f"{u.period.value:<8} {u.used:>10} {u.limit:>10} {u.remaining:>10}  {resets}")
    return lines


class Unlimited:
    """RATE_LIMIT_ENABLED=false: everything is admitted, nothing is stored."""

    name = "unlimited"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.now = clock

    async def admit(self, n: int) -> rl.Decision:
        return rl.Decision(n, n)

    async def refund(self, reserved_at: float, n: int) -> None:
        return None

    def usage(self) -> list[rl.TierUsage]:
        return []

    @property
    def healthy(self) -> tuple[bool, str | None]:
        return True, None


class SqliteLimiter:
    def __init__(
        self,
        store: RateLimitStore,
        limits: dict[rl.Period, int],
        *,
        strategy: rl.Strategy,
        tz_name: str,
        metrics: Metrics | None,
        clock: Callable[[], float] = time.time,
        name: str = "global",
    ) -> None:
        self.name = name
        self.now = clock
        self._store = store
        self._metrics = metrics
        self._tz_name = tz_name
        tz = zoneinfo.ZoneInfo(tz_name)
        self.state = rl.new_state(limits, strategy=strategy, tz=tz)
        rows, meta = store.load()
        old_strategy = meta.get("strategy")
        if old_strategy and (old_strategy != strategy.value or meta.get("timezone") != tz_name):
            rows = rl.convert_rows(
                rows,
                from_strategy=rl.Strategy(old_strategy),
                from_tz=zoneinfo.ZoneInfo(meta.get("timezone", "UTC")),
                to_state=self.state,
                now=clock(),
            )
            store.replace_all(rows, {"strategy": strategy.value, "timezone": tz_name})
        elif not old_strategy:
            store.replace_all(rows, {"strategy": strategy.value, "timezone": tz_name})
        self.state = rl.with_counts(self.state, rows)
        self._lock = trio.Lock()
        self._admissions = 0
        self._watch = TierWatch(name, metrics)
        self._watch.update(rl.usage(self.state, clock()))

    @property
    def healthy(self) -> tuple[bool, str | None]:
        db = self._store.db
        return db.writable, db.last_error

    async def admit(self, n: int) -> rl.Decision:
        async with self._lock:
            t0 = time.perf_counter()
            now = self.now()
            new_state, decision = rl.admit(self.state, now, n)
            if decision.charges:
                self._admissions += 1
                prune = {t.period: rl.prune_before(new_state, t.period, now) for t in new_state.tiers} if self._admissions % 200 == 0 else None
                await self._store.apply(decision.charges, prune)  # raises StoreError: nothing admitted
            self.state = new_state
            if self._metrics is not None:
                self._metrics.rl_check.observe(time.perf_counter() - t0)
                if decision.admitted < n:
                    for p in decision.exhausted:
                        self._metrics.rl_exceeded.labels(p.value).inc()
            self._watch.update(rl.usage(self.state, now), decision.retry_at)
            return decision

    async def refund(self, reserved_at: float, n: int) -> None:
        if n <= 0:
            return
        async with self._lock:
            new_state, charges = rl.refund(self.state, reserved_at, n)
            if charges:
                await self._store.apply(charges)
            self.state = new_state
            self._watch.update(rl.usage(self.state, self.now()))

    def usage(self) -> list[rl.TierUsage]:
        return rl.usage(self.state, self.now())


def build_limiter(
    settings: Settings, limits: Limits, path: str, *, metrics: Metrics | None, name: str, clock: Callable[[], float] = time.time
) -> Limiter:
    if not settings.rate_limit_enabled or not limits.enabled():
        return Unlimited(clock)
    return SqliteLimiter(
        RateLimitStore(path), limits_map(limits), strategy=settings.rate_limit_strategy, tz_name=settings.rate_limit_timezone,
        metrics=metrics, clock=clock, name=name,
    )
