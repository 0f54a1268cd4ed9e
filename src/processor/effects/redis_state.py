"""Shared state for several replicas: rate-limit counters and task leases in Redis.

* Rate limits: one admission is one atomic Lua script across all tiers. Time is Redis's own
  (`TIME`), so replicas with skewed clocks agree; calendar boundaries need time-zone rules
  Lua lacks, so the client computes them (from Redis time, with the same pure functions the
  SQLite limiter uses) and passes them in. The script applies exactly the pure core's rule
  (`processor.pure.ratelimit`); a property test runs both side by side.
* Leases: `SET`-if-absent with a TTL and this replica's owner id, renewed while the task is
  in flight (renewal checks the owner), deleted when it is reported. A replica that loses a
  lease abandons the task without PATCHing it. Delivery stays at-least-once.
* Redis unreachable: fail closed. Nothing is admitted or claimed, /ready says why, calls are
  retried with backoff; never a silent fallback to per-process limits (that would let N
  replicas spend N times the budget).

The client is coredis, which runs natively on trio and cancels cleanly.
"""

from __future__ import annotations

import math
import os
import socket
import time
import zoneinfo
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import coredis
import trio

from processor.effects.limiter import (
    LimiterConfig,
    LimiterError,
    TierWatch,
    Unlimited,
    format_usage,
    free_decision,
    has_budgets,
)
from processor.effects.logs import REDACTOR, get_logger
from processor.effects.metrics import Metrics
from processor.effects.retrying import retrying
from processor.pure import ratelimit as rl
from processor.pure.budget import ModelPrice
from processor.pure.faults import Dependency, Fault

# KEYS: one hash per tier (bucket -> amount), then the high-water key. ARGV: m (tasks), now,
# then per tier: limit, bucket, cutoff, ttl_ms; then per task, its amount per tier. Tasks are
# taken in order while each fits every tier it needs (an amount of 0 needs no room); the
# first that does not fit stops the rest. Returns {admitted, now, hashes...}. A `now` earlier
# than the high-water mark (Redis's clock stepped back) admits nothing and returns {-1, mark}:
# the client recomputes the buckets at the mark and asks again, so no admission is ever
# evaluated before one already made.
ADMIT_LUA = """
local m = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local tiers = #KEYS - 1
local hwkey = KEYS[#KEYS]
local hw = redis.call('GET', hwkey)
if hw and tonumber(hw) > now then return {-1, hw} end
local used, limit, add = {}, {}, {}
local maxttl = 0
for i = 1, tiers do
  local base = 2 + (i - 1) * 4
  limit[i] = tonumber(ARGV[base + 1])
  local cutoff = tonumber(ARGV[base + 3])
  local ttl = tonumber(ARGV[base + 4])
  if ttl > maxttl then maxttl = ttl end
  local h = redis.call('HGETALL', KEYS[i])
  local u = 0
  for j = 1, #h, 2 do
    if tonumber(h[j]) < cutoff then
      redis.call('HDEL', KEYS[i], h[j])
    else
      u = u + tonumber(h[j + 1])
    end
  end
  used[i] = u
  add[i] = 0
end
local first = 2 + tiers * 4
local admitted = 0
for j = 1, m do
  local at = first + (j - 1) * tiers
  local fits = true
  for i = 1, tiers do
    local a = tonumber(ARGV[at + i])
    if a > 0 and used[i] + a > limit[i] then fits = false; break end
  end
  if not fits then break end
  for i = 1, tiers do
    local a = tonumber(ARGV[at + i])
    used[i] = used[i] + a
    add[i] = add[i] + a
  end
  admitted = j
end
if maxttl > 0 then redis.call('SET', hwkey, ARGV[2], 'PX', maxttl) end
for i = 1, tiers do
  if add[i] > 0 then
    local base = 2 + (i - 1) * 4
    redis.call('HINCRBY', KEYS[i], ARGV[base + 2], add[i])
    redis.call('PEXPIRE', KEYS[i], ARGV[base + 4])
  end
end
local out = {admitted, ARGV[2]}
for i = 1, tiers do out[#out + 1] = redis.call('HGETALL', KEYS[i]) end
return out
"""

# KEYS: one hash per tier, then the high-water key. ARGV: the latest reservation instant
# (raises the mark to it, '' for none), then per tier a ttl_ms, a count c, then c pairs
# (bucket, signed amount). A negative amount takes back at most what the bucket holds (never
# below zero); a positive one (a settlement above the estimate) is added whatever the limit,
# and gives the hash a TTL if it had none.
APPLY_LUA = """
local out = {}
local tiers = #KEYS - 1
if ARGV[1] ~= '' then
  local hw = redis.call('GET', KEYS[#KEYS])
  if not hw or tonumber(hw) < tonumber(ARGV[1]) then redis.call('SET', KEYS[#KEYS], ARGV[1], 'PX', 32 * 86400 * 1000) end
end
local pos = 2
for i = 1, tiers do
  local ttl = ARGV[pos]
  local c = tonumber(ARGV[pos + 1]); pos = pos + 2
  for j = 1, c do
    local b, amount = ARGV[pos], tonumber(ARGV[pos + 1]); pos = pos + 2
    if amount < 0 then
      local have = tonumber(redis.call('HGET', KEYS[i], b) or '0')
      local back = math.min(have, -amount)
      if back > 0 then
        if have - back > 0 then redis.call('HINCRBY', KEYS[i], b, -back) else redis.call('HDEL', KEYS[i], b) end
      end
    elseif amount > 0 then
      redis.call('HINCRBY', KEYS[i], b, amount)
      if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], ttl) end
    end
  end
  out[#out + 1] = redis.call('HGETALL', KEYS[i])
end
return out
"""

# KEYS: one hash per tier, then the high-water key.
STATE_LUA = """
local out = {redis.call('GET', KEYS[#KEYS]) or ''}
for i = 1, #KEYS - 1 do out[#out + 1] = redis.call('HGETALL', KEYS[i]) end
return out
"""

TIME_LUA = "return redis.call('TIME')"

ACQUIRE_LUA = """
local out = {}
for i = 1, #KEYS do
  if redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then out[i] = 1 else out[i] = 0 end
end
return out
"""

RENEW_LUA = """
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2]); out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

RELEASE_LUA = """
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('DEL', KEYS[i]) end
end
return #KEYS
"""

COMPLETE_LUA = """
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('SET', KEYS[i], 'done:' .. ARGV[1], 'PX', ARGV[2]) end
end
return #KEYS
"""

LIVE_LUA = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('EXISTS', KEYS[i]) end
return out
"""


class RedisUnavailable(Exception):
    """Redis could not be reached or answered with an error: fail closed."""


class RedisShared:
    """One coredis client, its scripts, and the reachability every user reports."""

    def __init__(self, client: Any, *, prefix: str = "processor", metrics: Metrics | None = None) -> None:
        self.client = client
        self.metrics = metrics
        self.prefix = prefix
        self.unavailable: str | None = None
        self._log = get_logger("redis")
        self._scripts = {name: client.register_script(src) for name, src in (
            ("admit", ADMIT_LUA), ("apply", APPLY_LUA), ("state", STATE_LUA), ("time", TIME_LUA),
            ("acquire", ACQUIRE_LUA), ("renew", RENEW_LUA), ("release", RELEASE_LUA), ("complete", COMPLETE_LUA), ("live", LIVE_LUA))}
        self.round_trips = 0

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        self.round_trips += 1
        if self.metrics is not None:
            self.metrics.redis_round_trips.labels(name).inc()
        try:
            with trio.fail_after(5):
                out = await self._scripts[name](keys=list(keys), args=[str(a) for a in args])
        except (coredis.exceptions.RedisError, OSError, trio.TooSlowError) as exc:
            if self.unavailable is None:
                self._log.error("redis_unavailable", error=f"{type(exc).__name__}: {exc}",
                                action="not admitting or claiming until Redis answers")
            self.unavailable = f"{type(exc).__name__}: {exc}"
            raise RedisUnavailable(self.unavailable) from None
        if self.unavailable is not None:
            self._log.info("redis_available_again")
            self.unavailable = None
        return out

    async def watch(self) -> None:
        """While Redis is marked unavailable, ask it for the time every few seconds, so that
        readiness comes back as soon as Redis does, even when no work needs it."""
        while True:
            await trio.sleep(0.5)
            if self.unavailable is None:
                continue
            # the one retry primitive: back off (up to 5 s) until Redis tells the time again
            async for attempt in retrying(name="redis_watch", on=lambda e: isinstance(e, RedisUnavailable),
                                          attempts=1_000_000_000, base=0.5, cap=5.0):
                with attempt:
                    await self.now()

    async def now(self) -> float:
        sec, usec = await self.call("time", [], [])
        return int(sec) + int(usec) / 1e6


def _pairs(flat: Sequence[Any]) -> dict[int, int]:
    return {int(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


class RedisLimiter:
    """The multi-tier limiter with its counters in Redis (same interface as SqliteLimiter),
    shared by every replica: task, token and spend tiers, one atomic script per admission.

    Raises only `LimiterError` (kind UNREACHABLE when Redis cannot be reached)."""

    def __init__(self, shared: RedisShared, limits: dict[rl.Period, int], *, strategy: rl.Strategy, tz_name: str,
                 metrics: Metrics | None, name: str = "global", tokens: dict[rl.Period, int] | None = None,
                 spend: dict[rl.Period, int] | None = None, prices: Mapping[str, ModelPrice] | None = None) -> None:
        self.name = name
        self._shared = shared
        self._metrics = metrics
        self._tz = zoneinfo.ZoneInfo(tz_name)
        self._base = rl.new_state(limits, strategy=strategy, tz=self._tz, tokens=tokens, spend=spend, prices=prices)
        self.state = self._base
        self._offset = 0.0  # Redis time minus local time, for usage() between calls
        base = f"{shared.prefix}:rl:{name}:{strategy.value}:{tz_name}"
        # task tiers keep the key names of the first release (counters carry over)
        self._keys = [f"{base}:{t.period.value}" if t.metric is rl.Metric.TASKS else f"{base}:{t.metric.value}:{t.period.value}"
                      for t in self._base.tiers]
        self._hw_key = f"{shared.prefix}:rl:{name}:high_water"
        self._pending: dict[tuple[rl.Metric, rl.Period, int], int] = {}  # settlements Redis could not take yet
        self._pending_mark: float | None = None
        self._watch = TierWatch(name, metrics, shared="redis")

    def now(self) -> float:
        return time.time() + self._offset

    @property
    def budgets(self) -> bool:
        return has_budgets(self._base)

    @property
    def healthy(self) -> tuple[bool, str | None]:
        return self._shared.unavailable is None, self._shared.unavailable

    def _tier_args(self, now: float) -> list[Any]:
        args: list[Any] = []
        for tier in self._base.tiers:
            bucket = rl.bucket_of(self._base.strategy, self._tz, tier.period, now)
            if self._base.strategy is rl.Strategy.FIXED:
                cutoff = bucket
                ttl = rl.calendar_period(tier.period, now, self._tz)[1] - now + 60
            else:
                g, w = rl.GRANULARITY[tier.period], rl.ROLLING_WINDOW[tier.period]
                # counted iff b > now - g - w - SLACK, i.e. b >= floor(now - g - w - SLACK) + 1
                cutoff = math.floor(now - g - w - rl.SLACK) + 1
                ttl = g + w + rl.SLACK + 60
            args += [tier.limit, bucket, cutoff, int(ttl * 1000)]
        return args

    def _load(self, hashes: Sequence[Sequence[Any]], high_water: float | None = None) -> None:
        rows = [(tier.metric, tier.period, b, c) for tier, flat in zip(self._base.tiers, hashes, strict=True) for b, c in _pairs(flat).items()]
        hw = self.state.high_water if high_water is None else max(self.state.high_water, high_water)
        self.state = rl.with_counts(self._base, rows, high_water=hw)

    async def _call(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self._shared.call(script, keys, args)
        except RedisUnavailable as exc:
            raise LimiterError(Fault.UNREACHABLE, f"redis: {exc}", dependency=Dependency.REDIS) from None

    async def admit(self, n: int | Sequence[rl.Demand]) -> rl.Decision:
        """Reserve for `n` tasks (or one per `Demand`) at Redis's time. Raises `LimiterError`
        (nothing admitted)."""
        if not self._base.tiers:
            return free_decision(self.now(), n)
        try:
            now = await self._shared.now()  # Redis's clock: replicas with skewed clocks agree
        except RedisUnavailable as exc:
            raise LimiterError(Fault.UNREACHABLE, f"redis: {exc}", dependency=Dependency.REDIS) from None
        self._offset = now - time.time()
        return await self.admit_at(n, now)

    async def admit_at(self, n: int | Sequence[rl.Demand], now: float) -> rl.Decision:
        """One atomic admission at Redis time `now` (the script applies the pure rule), or at
        the shared high-water mark when `now` is earlier than it."""
        if not self._base.tiers:
            return rl.admit(self._base, now, n)[1]
        t0 = time.perf_counter()
        plans = rl.plan(self._base, n)
        candidates = [p for p in plans if p.refusal is None]
        needs = [a for p in candidates for a in p.need]
        await self._flush()  # settlements first: nothing is admitted past what was spent
        before = self.state
        try:
            for _ in range(5):  # the mark only moves forward: a retry at it succeeds unless another replica moved it
                out = await self._call("admit", [*self._keys, self._hw_key], [len(candidates), repr(now), *self._tier_args(now), *needs])
                if int(out[0]) >= 0:
                    break
                now = float(out[1])
            else:
                raise LimiterError(Fault.UNREACHABLE, "redis: the shared clock mark kept moving; try again", dependency=Dependency.REDIS)
            admitted = int(out[0])
            self._load(out[2:], now)
        except (ValueError, TypeError, IndexError) as exc:
            raise LimiterError(Fault.MALFORMED, f"redis: unexpected answer from the admission script: {exc}", dependency=Dependency.REDIS) from None
        decision = rl.decide(before, self.state, now, plans, admitted)
        if self._metrics is not None:
            self._metrics.rl_check.observe(time.perf_counter() - t0)
            if decision.admitted < decision.requested:
                for p in decision.exhausted:
                    self._metrics.rl_exceeded.labels(p.value).inc()
        self._watch.update(rl.usage(self.state, now), decision.retry_at)
        return decision

    def _apply_args(self, deltas: Mapping[tuple[rl.Metric, rl.Period, int], int]) -> list[Any]:
        args: list[Any] = []
        for tier in self._base.tiers:
            pairs = sorted((b, n) for (m, p, b), n in deltas.items() if m is tier.metric and p is tier.period and n)
            # long enough for any period the bucket can count in (a calendar month has 31 days)
            ttl = (rl.ROLLING_WINDOW[tier.period] + rl.GRANULARITY[tier.period] + rl.SLACK + 86_400 + 60) * 1000
            args += [ttl, len(pairs)]
            for b, n in pairs:
                args += [b, n]
        return args

    async def _apply(self, deltas: Mapping[tuple[rl.Metric, rl.Period, int], int], what: str, mark: float | None = None) -> None:
        out = await self._call("apply", [*self._keys, self._hw_key], ["" if mark is None else repr(mark), *self._apply_args(deltas)])
        try:
            self._load(out)
        except (ValueError, TypeError) as exc:
            raise LimiterError(Fault.MALFORMED, f"redis: unexpected answer from the {what} script: {exc}", dependency=Dependency.REDIS) from None
        self._watch.update(self.usage())

    async def _flush(self) -> None:
        """Write the settlements Redis could not take yet. Raises `LimiterError`."""
        if not self._pending:
            return
        pending, mark = self._pending, self._pending_mark
        self._pending, self._pending_mark = {}, None  # taken: a concurrent caller does not send them again
        try:
            await self._apply(pending, "settle", mark)
        except BaseException:
            # not written (or not known to be: cancelled mid-call): keep them, counting twice
            # rather than never
            for k, v in pending.items():
                self._pending[k] = self._pending.get(k, 0) + v
            if mark is not None:
                self._pending_mark = mark if self._pending_mark is None else max(mark, self._pending_mark)
            raise

    async def refund(self, reservations: Sequence[rl.Reservation]) -> None:
        """Give back what `reservations` were charged. Raises `LimiterError`."""
        if not reservations or not self._base.tiers:
            return
        await self._flush()
        await self._apply({k: -n for k, n in rl.merge(reservations).items() if n > 0}, "refund")

    async def settle(self, reservations: Sequence[rl.Reservation], *, tokens_in: int, tokens_out: int) -> tuple[rl.Reservation, ...]:
        """Replace the estimates of one request's reservations by its real usage. Returns
        the settled reservations. Never raises for Redis: a settlement Redis cannot take now
        counts in this process at once and is written before the next admission or refund
        (which fail closed until it is). Do not settle the same reservations twice."""
        if not reservations:
            return ()
        deltas, settled = rl.settlement(self._base, reservations, tokens_in, tokens_out)
        if deltas and self._base.tiers:
            mark = max(r.at for r in reservations)
            for k, v in deltas.items():
                self._pending[k] = self._pending.get(k, 0) + v
            self._pending_mark = mark if self._pending_mark is None else max(mark, self._pending_mark)
            try:
                await self._flush()
            except LimiterError as exc:
                self.state = rl.apply(self.state, deltas)[0]
                get_logger("ratelimit").warning("settlement_deferred", limiter=self.name, error=str(exc),
                                                action="written before the next admission")
            self._load_mark(mark)
        return settled

    def _load_mark(self, at: float) -> None:
        if at > self.state.high_water:
            self.state = attrs.evolve(self.state, high_water=at)

    def reservation_at(self, at: float, units: int = 1) -> rl.Reservation:
        return rl.reservation_at(self._base, at, units)

    async def refresh(self) -> None:
        """Read the shared counters (for `limits` and /health). Raises `LimiterError`."""
        out = await self._call("state", [*self._keys, self._hw_key], [])
        try:
            self._load(out[1:], float(out[0]) if out[0] else None)
        except (ValueError, TypeError) as exc:
            raise LimiterError(Fault.MALFORMED, f"redis: unexpected answer from the state script: {exc}", dependency=Dependency.REDIS) from None

    def usage(self) -> list[rl.TierUsage]:
        return rl.usage(self.state, self.now())


class RedisLeases:
    """Task leases shared by replicas (see the module docstring)."""

    def __init__(self, shared: RedisShared, *, ttl: float, owner: str | None = None) -> None:
        self._shared = shared
        self.ttl = ttl
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        # id -> the number of the acquisition that took it: a renewal answer that comes back
        # after the lease was let go of (reported, released) and maybe taken again counts
        # only for the same acquisition
        self.owned: dict[str, int] = {}
        self._taken = 0
        self._lost: set[str] = set()  # emptied as the book lets go of each lost task
        self._last_renewal = trio.current_time()
        self._log = get_logger("leases")

    @property
    def unavailable(self) -> str | None:
        return self._shared.unavailable

    def _key(self, task_id: str) -> str:
        return f"{self._shared.prefix}:lease:{task_id}"

    async def acquire(self, task_ids: Sequence[str]) -> list[str]:
        if not task_ids:
            return []
        out = await self._shared.call("acquire", [self._key(t) for t in task_ids], [self.owner, int(self.ttl * 1000)])
        got = [t for t, ok in zip(task_ids, out, strict=True) if int(ok)]
        for t in got:
            self._taken += 1
            self.owned[t] = self._taken
        self._lost.difference_update(got)  # a lease taken again is not lost
        return got

    async def release(self, task_ids: Sequence[str]) -> None:
        await self._let_go("release", task_ids)

    async def complete(self, task_ids: Sequence[str]) -> None:
        """Reported: the lease becomes a short-lived 'done' marker instead of disappearing,
        so a replica still working through a pending list read before the report cannot
        take the task again (its lease request finds the key taken)."""
        await self._let_go("complete", task_ids)

    async def _let_go(self, script: str, task_ids: Sequence[str]) -> None:
        mine = [t for t in task_ids if t in self.owned]
        for t in task_ids:
            self.owned.pop(t, None)
        self._lost.difference_update(task_ids)
        if not mine:
            return
        try:
            await self._shared.call(script, [self._key(t) for t in mine], [self.owner, int(self.ttl * 1000)])
        except RedisUnavailable:
            pass  # the lease expires by itself after its TTL

    async def live(self, task_ids: Sequence[str]) -> set[str]:
        if not task_ids:
            return set()
        out = await self._shared.call("live", [self._key(t) for t in task_ids], [])
        return {t for t, ok in zip(task_ids, out, strict=True) if int(ok)}

    def lost(self) -> set[str]:
        return set(self._lost)

    async def renew_forever(self) -> None:
        """Renew owned leases every TTL/3; a lease that cannot be renewed is lost."""
        while True:
            await trio.sleep(self.ttl / 3)
            held = dict(self.owned)
            ids = sorted(held)
            if not ids:
                self._last_renewal = trio.current_time()
                continue
            try:
                out = await self._shared.call("renew", [self._key(t) for t in ids], [self.owner, int(self.ttl * 1000)])
            except RedisUnavailable:
                if trio.current_time() - self._last_renewal > self.ttl:
                    self._lose(held, ids, "redis unreachable past the lease TTL")
                continue
            self._last_renewal = trio.current_time()
            gone = [t for t, ok in zip(ids, out, strict=True) if not int(ok)]
            if gone:
                self._lose(held, gone, "lease taken over or expired")

    def _lose(self, held: dict[str, int], ids: Sequence[str], why: str) -> None:
        """`ids` could not be renewed. Only those still held by the same acquisition are lost:
        while the renewal was on its way, a task may have been reported (its lease turned
        into a done marker) or released, and even taken again."""
        ids = [t for t in ids if self.owned.get(t) == held[t]]
        fresh = [t for t in ids if t not in self._lost]
        self._lost.update(ids)
        for t in ids:
            del self.owned[t]
        if fresh:
            self._log.warning("leases_lost", count=len(fresh), why=why, action="abandoning those tasks without reporting")


def make_client(url: str) -> Any:
    """A coredis client for REDIS_URL (its password goes to the redactor)."""
    REDACTOR.add(_password(url))
    return coredis.Redis.from_url(url, decode_responses=True, connect_timeout=2, stream_timeout=3)


def _password(url: str) -> str | None:
    from urllib.parse import urlsplit

    return urlsplit(url).password


def build_limiter(config: LimiterConfig, shared: RedisShared, *, metrics: Metrics | None) -> Any:
    """A limiter on the shared Redis state, or `Unlimited` when no tier is set."""
    if not config.limited:
        return Unlimited()
    return RedisLimiter(shared, dict(config.tasks), strategy=config.strategy, tz_name=config.tz_name,
                        metrics=metrics, name=config.name, **config.budgets())


async def print_redis_limits(url: str, prefix: str, config: LimiterConfig) -> int:
    """`processor limits` with STATE_BACKEND=redis: the global limiter's usage."""
    client = make_client(url)
    async with client:
        shared = RedisShared(client, prefix=prefix)
        limiter = build_limiter(config, shared, metrics=None)
        try:
            await limiter.refresh()
            now = await shared.now()
            limiter._offset = now - time.time()
        except (LimiterError, RedisUnavailable) as exc:
            print(f"processor: redis unavailable: {exc}")
            return 1
    print(f"store: redis  strategy: {config.strategy.value}  zone: {config.tz_name}")
    print("\n".join(format_usage(limiter.usage())))
    return 0
