"""The rate limiter's shell: the pure decision, persisted before it counts.

`SqliteLimiter.admit(n)` decides with `processor.pure.ratelimit.admit`, writes the charges
(and the clock's high-water mark) in one transaction, and only then returns the decision;
if the write fails, nothing is admitted and `LimiterError` is raised (work never goes
through uncounted). `refund(reservations)` gives back exactly what those reservations were
charged, to the buckets they were charged to.

Every limiter raises only `LimiterError` for a store failure (SQLite or Redis), never the
store's own exceptions: callers handle all limiters alike.
"""

from __future__ import annotations

import math
import sqlite3
import time
import zoneinfo
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import trio

from processor.config import Limits
from processor.effects.logs import get_logger
from processor.effects.metrics import Metrics
from processor.effects.store import SqliteDb, StoreError
from processor.pure import ratelimit as rl
from processor.pure.budget import NANO, ModelPrice, format_money
from processor.pure.faults import Dependency, DependencyError, Fault


class LimiterError(DependencyError):
    """The limiter's store failed: nothing was admitted (or refunded) by this call.

    `dependency` is `STORE` (SQLite) or `REDIS`; `kind` (= `fault`) says which way:
    `UNREACHABLE` (Redis down or too slow: try again later), `SERVER` (the store refused a
    write: disk full, read-only, locked), `MALFORMED` (the store cannot be opened, or holds
    data or answers this release cannot read). The message never holds a secret."""

    def __init__(self, kind: Fault, message: str, *, dependency: Dependency = Dependency.STORE) -> None:
        super().__init__(message, kind)
        self.dependency = dependency


class Limiter(Protocol):
    """What the stages use. Every method that touches the store raises only `LimiterError`."""

    name: str

    @property
    def budgets(self) -> bool: ...  # a token or spend tier is on: admit `Demand`s, settle after each call

    async def admit(self, n: int | Sequence[rl.Demand]) -> rl.Decision: ...
    async def refund(self, reservations: Sequence[rl.Reservation]) -> None: ...
    async def settle(self, reservations: Sequence[rl.Reservation], *, tokens_in: int, tokens_out: int) -> tuple[rl.Reservation, ...]: ...
    def reservation_at(self, at: float, units: int = 1) -> rl.Reservation: ...
    def usage(self) -> list[rl.TierUsage]: ...
    def now(self) -> float: ...
    @property
    def healthy(self) -> tuple[bool, str | None]: ...


# --- the SQLite store --------------------------------------------------------------------

RATE_LIMIT_MIGRATIONS = [
    # 1 (a6a26dd): task counters only
    """
    CREATE TABLE counters (period TEXT NOT NULL, bucket INTEGER NOT NULL, units INTEGER NOT NULL,
                           PRIMARY KEY (period, bucket));
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
    """,
    # 2: a metric per counter (tasks, tokens, spend); version-1 rows are task counts
    """
    CREATE TABLE counters_v2 (metric TEXT NOT NULL, period TEXT NOT NULL, bucket INTEGER NOT NULL,
                              units INTEGER NOT NULL, PRIMARY KEY (metric, period, bucket));
    INSERT INTO counters_v2 SELECT 'tasks', period, bucket, units FROM counters;
    DROP TABLE counters;
    ALTER TABLE counters_v2 RENAME TO counters
    """,
]


class RateLimitStore:
    """Counters per (metric, period, bucket) and meta (strategy, zone, high-water mark).
    Every admission is persisted before the claim. Raises `StoreError`."""

    def __init__(self, path: str) -> None:
        self.db = SqliteDb(path, RATE_LIMIT_MIGRATIONS, synchronous="FULL")

    def load(self) -> tuple[list[rl.Row], dict[str, str]]:
        try:
            rows = [(rl.Metric(m), rl.Period(p), int(b), int(u))
                    for m, p, b, u in self.db.query("SELECT metric, period, bucket, units FROM counters")]
        except ValueError as exc:
            raise StoreError(f"state store {self.db.path} holds an unknown metric or period: {exc}") from None
        meta = dict(self.db.query("SELECT key, value FROM meta"))
        return rows, meta

    def replace_all(self, rows: Iterable[rl.Row], meta: dict[str, str]) -> None:
        rows = list(rows)

        def fn(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM counters")
            c.executemany("INSERT INTO counters VALUES (?, ?, ?, ?)", [(m.value, p.value, b, u) for m, p, b, u in rows])
            c.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta.items()))

        self.db.tx(fn)

    @staticmethod
    def _apply(charges: Sequence[rl.Charge], prune: dict[rl.Period, int], high_water: float | None) -> Callable[[sqlite3.Connection], None]:
        def fn(c: sqlite3.Connection) -> None:
            c.executemany(
                "INSERT INTO counters VALUES (?, ?, ?, ?) ON CONFLICT (metric, period, bucket) DO UPDATE SET units = units + excluded.units",
                [(ch.metric.value, ch.period.value, ch.bucket, ch.units) for ch in charges],
            )
            c.execute("DELETE FROM counters WHERE units <= 0")
            for period, before in prune.items():
                c.execute("DELETE FROM counters WHERE period = ? AND bucket < ?", (period.value, before))
            if high_water is not None and math.isfinite(high_water):
                c.execute("INSERT OR REPLACE INTO meta VALUES ('high_water', ?)", (repr(high_water),))

        return fn

    async def apply(self, charges: Sequence[rl.Charge], prune: dict[rl.Period, int] | None = None, *, high_water: float | None = None) -> None:
        await self.db.run(self._apply(charges, prune or {}, high_water))


def _high_water(meta: dict[str, str]) -> float | None:
    try:
        hw = float(meta.get("high_water", "nan"))
    except ValueError:
        return None
    return hw if math.isfinite(hw) else None


def has_budgets(state: rl.LimiterState) -> bool:
    """A token or spend tier is on."""
    return any(t.metric is not rl.Metric.TASKS for t in state.tiers)


def limits_map(limits: Limits) -> dict[rl.Period, int]:
    return {rl.Period(k): v for k, v in limits.enabled().items()}


class TierWatch:
    """Logs a tier's exhaustion once when it happens and once when it frees (not per poll),
    and publishes usage gauges (for the global limiter only)."""

    def __init__(self, name: str, metrics: Metrics | None, **context: str) -> None:
        self._name = name
        self._metrics = metrics if name == "global" else None
        self._exhausted: set[tuple[rl.Metric, rl.Period]] = set()
        self._log = get_logger("ratelimit").bind(limiter=name, **context)

    def update(self, usage: list[rl.TierUsage], retry_at: float | None = None) -> None:
        exhausted = {(u.metric, u.period) for u in usage if u.remaining <= 0}
        for m, p in exhausted - self._exhausted:
            self._log.warning("rate_limit_exhausted", metric=m.value, period=p.value, retry_at=retry_at)
        for m, p in self._exhausted - exhausted:
            self._log.info("rate_limit_available", metric=m.value, period=p.value)
        self._exhausted = exhausted
        if self._metrics is not None:
            for u in usage:
                if u.metric is rl.Metric.TASKS:
                    self._metrics.rl_usage.labels(u.period.value).set(u.used)
                    self._metrics.rl_max.labels(u.period.value).set(u.limit)
                    self._metrics.rl_remaining.labels(u.period.value).set(u.remaining)
                else:
                    scale = 1 / NANO if u.metric is rl.Metric.SPEND else 1
                    labels = (u.metric.value, u.period.value)
                    self._metrics.budget_used.labels(*labels).set(u.used * scale)
                    self._metrics.budget_limit.labels(*labels).set(u.limit * scale)
                    self._metrics.budget_remaining.labels(*labels).set(u.remaining * scale)


def _amount(metric: rl.Metric, n: int) -> str | int:
    return format_money(n) if metric is rl.Metric.SPEND else n


def tier_views(usage: list[rl.TierUsage]) -> list[dict[str, Any]]:
    """The tiers as /health shows them: task tiers as before; token and spend tiers with
    `metric` (spend in currency units, as decimal strings)."""
    out: list[dict[str, Any]] = []
    for u in usage:
        view: dict[str, Any] = {"period": u.period.value, "used": _amount(u.metric, u.used), "limit": _amount(u.metric, u.limit),
                                "remaining": _amount(u.metric, u.remaining), "resets_at": u.resets_at}
        if u.metric is not rl.Metric.TASKS:
            view = {"metric": u.metric.value, **view}
        out.append(view)
    return out


def format_usage(usage: list[rl.TierUsage]) -> list[str]:
    """The `limits` command's table (token and spend tiers as `tokens/day`, `spend/month`;
    spend in currency units)."""
    from datetime import UTC, datetime

    lines = [f"{'period':<14} {'used':>14} {'limit':>14} {'remaining':>14}  resets at"]
    for u in usage:
        resets = datetime.fromtimestamp(u.resets_at, UTC).isoformat(timespec="seconds") if u.resets_at else "-"
        label = u.period.value if u.metric is rl.Metric.TASKS else f"{u.metric.value}/{u.period.value}"
        lines.append(f"{label:<14} {_amount(u.metric, u.used)!s:>14} {_amount(u.metric, u.limit)!s:>14} "
                     f"{_amount(u.metric, u.remaining)!s:>14}  {resets}")
    return lines


def free_decision(now: float, demands: int | Sequence[rl.Demand]) -> rl.Decision:
    """Everything admitted (no tier is on)."""
    n = demands if isinstance(demands, int) else len(demands)
    return rl.Decision(n, n, reservations=(rl.Reservation(now, 1, ()),) * n, at=now, refusals=(None,) * n)


class Unlimited:
    """RATE_LIMIT_ENABLED=false: everything is admitted, nothing is stored."""

    name = "unlimited"
    budgets = False

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.now = clock

    async def admit(self, n: int | Sequence[rl.Demand]) -> rl.Decision:
        return free_decision(self.now(), n)

    async def refund(self, reservations: Sequence[rl.Reservation]) -> None:
        return None

    async def settle(self, reservations: Sequence[rl.Reservation], *, tokens_in: int, tokens_out: int) -> tuple[rl.Reservation, ...]:
        return tuple(reservations)

    def reservation_at(self, at: float, units: int = 1) -> rl.Reservation:
        return rl.Reservation(at, units, ())

    def usage(self) -> list[rl.TierUsage]:
        return []

    @property
    def healthy(self) -> tuple[bool, str | None]:
        return True, None


class SqliteLimiter:
    """The multi-tier limiter with its counters in a SQLite file (one process).

    Raises `LimiterError` (kind MALFORMED) when the file cannot be opened or read."""

    def __init__(
        self,
        store: RateLimitStore | str,
        limits: dict[rl.Period, int],
        *,
        strategy: rl.Strategy,
        tz_name: str,
        metrics: Metrics | None,
        clock: Callable[[], float] = time.time,
        name: str = "global",
        tokens: dict[rl.Period, int] | None = None,
        spend: dict[rl.Period, int] | None = None,
        prices: Mapping[str, ModelPrice] | None = None,
    ) -> None:
        self.name = name
        self.now = clock
        self._metrics = metrics
        self._tz_name = tz_name
        tz = zoneinfo.ZoneInfo(tz_name)
        self.state = rl.new_state(limits, strategy=strategy, tz=tz, tokens=tokens, spend=spend, prices=prices)
        try:
            self._store = RateLimitStore(store) if isinstance(store, str) else store
            rows, meta = self._store.load()
            old_strategy = meta.get("strategy")
            hw = _high_water(meta)
            if old_strategy and (old_strategy != strategy.value or meta.get("timezone") != tz_name):
                rows = rl.convert_rows(
                    rows,
                    from_strategy=rl.Strategy(old_strategy),
                    from_tz=zoneinfo.ZoneInfo(meta.get("timezone", "UTC")),
                    to_state=self.state,
                    now=max(clock(), hw or -math.inf),
                )
                self._store.replace_all(rows, {"strategy": strategy.value, "timezone": tz_name})
            elif not old_strategy:
                self._store.replace_all(rows, {"strategy": strategy.value, "timezone": tz_name})
        except StoreError as exc:
            raise LimiterError(Fault.MALFORMED, str(exc)) from None
        except (ValueError, zoneinfo.ZoneInfoNotFoundError) as exc:
            raise LimiterError(Fault.MALFORMED, f"rate-limit store holds unreadable meta data: {exc}") from None
        self.state = rl.with_counts(self.state, rows, high_water=hw)
        self._stored_high_water = self.state.high_water
        self._pending: list[rl.Charge] = []  # settlements the store could not take yet
        self._log = get_logger("ratelimit").bind(limiter=name)
        self._lock = trio.Lock()
        self._admissions = 0
        self._watch = TierWatch(name, metrics)
        self._watch.update(rl.usage(self.state, clock()))

    @property
    def budgets(self) -> bool:
        return has_budgets(self.state)

    @property
    def healthy(self) -> tuple[bool, str | None]:
        db = self._store.db
        return db.writable, db.last_error

    async def _write(self, charges: Sequence[rl.Charge], prune: dict[rl.Period, int] | None = None, high_water: float | None = None) -> None:
        """Persist `charges` after any settlement still waiting to be written, in one
        transaction. Raises `LimiterError` (nothing written)."""
        try:
            await self._store.apply([*self._pending, *charges], prune, high_water=high_water)
            self._pending = []
            if high_water is not None:
                self._stored_high_water = max(self._stored_high_water, high_water)
        except StoreError as exc:
            raise LimiterError(Fault.SERVER, str(exc)) from None
        except (sqlite3.Error, OSError) as exc:  # anything the store did not classify itself
            raise LimiterError(Fault.SERVER, f"{self._store.db.path}: {type(exc).__name__}: {exc}") from None

    async def admit(self, n: int | Sequence[rl.Demand]) -> rl.Decision:
        """Reserve for `n` tasks (or one per `Demand`) now. Raises `LimiterError` (nothing admitted)."""
        async with self._lock:
            t0 = time.perf_counter()
            now = self.now()
            new_state, decision = rl.admit(self.state, now, n)
            if decision.charges or new_state.high_water > self._stored_high_water:
                # The mark is stored whenever it moves, so that a restart never evaluates
                # earlier than this process already did (a counter it pruned in memory, e.g.
                # refunded after its window, may still be on disk).
                self._admissions += 1
                prune = {t.period: rl.prune_before(new_state, t.period, now) for t in new_state.tiers} if self._admissions % 200 == 0 else None
                await self._write(decision.charges, prune, new_state.high_water)  # nothing admitted if it fails
            self.state = new_state
            if self._metrics is not None:
                self._metrics.rl_check.observe(time.perf_counter() - t0)
                if decision.admitted < decision.requested:
                    for p in decision.exhausted:
                        self._metrics.rl_exceeded.labels(p.value).inc()
            self._watch.update(rl.usage(self.state, now), decision.retry_at)
            return decision

    async def refund(self, reservations: Sequence[rl.Reservation]) -> None:
        """Give back what `reservations` were charged. Raises `LimiterError` (nothing given back)."""
        if not reservations:
            return
        async with self._lock:
            new_state, charges = rl.refund(self.state, reservations)
            if charges:
                await self._write(charges)
            self.state = new_state
            self._watch.update(rl.usage(self.state, self.now()))

    async def settle(self, reservations: Sequence[rl.Reservation], *, tokens_in: int, tokens_out: int) -> tuple[rl.Reservation, ...]:
        """Replace the estimates of one request's reservations by its real `usage` (totals
        for the request). Returns the settled reservations. Never raises for the store: a
        settlement the store cannot take now counts in this process at once and is written
        with the next successful write (meanwhile the store reports unhealthy, and nothing is
        admitted, since admissions write too). Do not settle the same reservations twice."""
        if not reservations:
            return ()
        async with self._lock:
            new_state, charges, settled = rl.settle(self.state, reservations, tokens_in, tokens_out)
            self.state = new_state  # what was spent counts at once, written or not
            if charges:
                try:
                    await self._write(charges, None, new_state.high_water)
                except LimiterError as exc:
                    self._pending += charges
                    self._log.warning("settlement_deferred", error=str(exc), action="written with the next successful write")
            self._watch.update(rl.usage(self.state, self.now()))
            return settled

    def reservation_at(self, at: float, units: int = 1) -> rl.Reservation:
        """The reservation an admission at `at` (a stored `Reservation.at`) made."""
        return rl.reservation_at(self.state, at, units)

    def usage(self) -> list[rl.TierUsage]:
        return rl.usage(self.state, self.now())


@attrs.frozen
class LimiterConfig:
    """What one limiter needs of the settings (`processor.wiring.limiter_configs`): its
    tiers per period (tasks; the global limiter also tokens and spend, with the prices) and
    how periods are counted. A limiter with no tier is `Unlimited`."""

    name: str  # "global" (task, token and spend tiers) or "openai" (task tiers)
    strategy: rl.Strategy
    tz_name: str
    tasks: Mapping[rl.Period, int] = attrs.field(factory=dict)
    tokens: Mapping[rl.Period, int] | None = None
    spend: Mapping[rl.Period, int] | None = None
    prices: Mapping[str, ModelPrice] | None = None

    @property
    def limited(self) -> bool:
        return bool(self.tasks or self.tokens or self.spend)

    def budgets(self) -> dict[str, Any]:
        """The token and spend tiers and prices, as the limiters take them."""
        out = {"tokens": self.tokens, "spend": self.spend, "prices": self.prices}
        return {k: dict(v) for k, v in out.items() if v is not None}


def build_limiter(config: LimiterConfig, path: str, *, metrics: Metrics | None, clock: Callable[[], float] = time.time) -> Limiter:
    """A limiter over the SQLite store at `path`, or `Unlimited` when no tier is set."""
    if not config.limited:
        return Unlimited(clock)
    return SqliteLimiter(
        path, dict(config.tasks), strategy=config.strategy, tz_name=config.tz_name,
        metrics=metrics, clock=clock, name=config.name, **config.budgets(),
    )
