"""Wikidata lookups for the triage results (CONTRACT.md §8), cached and bounded.

`Wikidata.resolve(names, people=...)` returns the entity found for each name it could
settle (None: Wikidata has no match) and, when it could not settle them all, why
(`down`, `slow`, `breaker_open`): the caller sends its result without those ids, which
§6 accepts. It never raises for Wikidata's sake.

Etiquette (Wikimedia's API policy): one request at a time (per process, and across
replicas through a Redis lock when the state is in Redis), `maxlag=5` on every request,
the `Retry-After` of a `maxlag` error, a 429 or a 503 honoured before the next request, and
a `User-Agent` naming the project and a contact. Answers are cached (SQLite in the state
directory, or Redis, shared by the replicas) for `WIKIDATA_CACHE_TTL_SECONDS`: a name is
searched at most once per TTL, an item's facts fetched at most once per TTL, and
`wbgetentities` takes up to 50 ids per request. The adapter has its own breaker.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
import orjson
import trio

import processor
from processor.effects.chat.metrics import ChatMetrics
from processor.effects.guard import BreakerOpen, Guard
from processor.effects.logs import get_logger
from processor.effects.store import secure_state_file
from processor.pure import wikidata as wd
from processor.pure.breaker import BreakerConfig, Outcome
from processor.pure.faults import Dependency, DependencyError, Fault
from processor.pure.triage import Entity

MAX_ATTEMPTS = 3  # per request, for maxlag / 429 / 503 (within the enrichment bound)
DEFAULT_PAUSE = 5.0  # seconds, when Wikidata asks to back off without saying how long
T = TypeVar("T")
LOCK_TTL_MS = 30_000  # a replica that dies holding the shared lock frees it after this


class _Pause(Exception):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class WikidataError(DependencyError):
    """A Wikidata request failed (`fault` says how); only ever seen inside this adapter."""

    dependency = Dependency.WIKIDATA


def user_agent(contact: str) -> str:
    return f"processor/{processor.__version__} (fact-checking triage; {contact}) httpx/{httpx.__version__}"


# --- the cache ------------------------------------------------------------------------------


class Cache(Protocol):
    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]: ...
    async def put_many(self, items: Mapping[str, Any], ttl: float) -> None: ...
    async def aclose(self) -> None: ...


class SqliteCache:
    """Answers by key in a SQLite file, each with an expiry (wall time)."""

    def __init__(self, path: str | Path, *, clock: Any = time.time) -> None:
        self._log = get_logger("wikidata")
        try:
            secure_state_file(Path(path))  # 0600 like every state file (its -wal/-shm follow)
            self._conn = self._open(str(path))
        except (sqlite3.Error, OSError) as exc:  # a cache is never worth a failed start
            self._log.error("wikidata_cache_unusable", path=str(path), error=str(exc), action="caching in memory only")
            self._conn = self._open(":memory:")
        self._limiter = trio.CapacityLimiter(1)
        self._clock = clock

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS wikidata_cache (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires_at REAL NOT NULL)")
        return conn

    def _get(self, keys: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        now = self._clock()
        for i in range(0, len(keys), 500):
            part = list(keys[i : i + 500])
            marks = ",".join("?" * len(part))
            for key, value, expires in self._conn.execute(
                f"SELECT key, value, expires_at FROM wikidata_cache WHERE key IN ({marks})", part
            ):
                if expires > now:
                    out[key] = orjson.loads(value)
        return out

    def _put(self, items: Mapping[str, Any], ttl: float) -> None:
        expires = self._clock() + ttl
        with self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany(
                "INSERT OR REPLACE INTO wikidata_cache (key, value, expires_at) VALUES (?, ?, ?)",
                [(k, orjson.dumps(v).decode(), expires) for k, v in items.items()],
            )

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        if not keys:
            return {}
        try:
            return await trio.to_thread.run_sync(self._get, keys, limiter=self._limiter)
        except (sqlite3.Error, ValueError) as exc:  # unreadable: a miss
            self._log.warning("wikidata_cache_unavailable", error=type(exc).__name__)
            return {}

    async def put_many(self, items: Mapping[str, Any], ttl: float) -> None:
        if items and ttl > 0:
            try:
                await trio.to_thread.run_sync(self._put, items, ttl, limiter=self._limiter)
            except sqlite3.Error as exc:  # disk full, read-only: the next lookup asks Wikidata again
                self._log.warning("wikidata_cache_unavailable", error=type(exc).__name__)

    async def aclose(self) -> None:
        self._conn.close()


class RedisCache:
    """Answers by key in Redis (`<prefix>:wikidata:<key>`), each with a TTL: shared by the
    replicas. A Redis failure is a miss (or a lost write), never an error."""

    def __init__(self, client: Any, *, prefix: str) -> None:
        self._client = client
        self._prefix = f"{prefix}:wikidata:"
        self._log = get_logger("wikidata")

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        if not keys:
            return {}
        try:
            with trio.fail_after(3):
                values = await self._client.mget([self._prefix + k for k in keys])
        except Exception as exc:  # coredis errors, OSError, timeouts: a miss
            self._log.warning("wikidata_cache_unavailable", error=type(exc).__name__)
            return {}
        return {k: orjson.loads(v) for k, v in zip(keys, values, strict=True) if v is not None}

    async def put_many(self, items: Mapping[str, Any], ttl: float) -> None:
        if not items or ttl <= 0:
            return
        try:
            with trio.fail_after(3):
                for k, v in items.items():
                    await self._client.set(self._prefix + k, orjson.dumps(v).decode(), ex=max(1, int(ttl)))
        except Exception as exc:
            self._log.warning("wikidata_cache_unavailable", error=type(exc).__name__)

    async def aclose(self) -> None:
        return None


# --- one request at a time ------------------------------------------------------------------

_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"


class Turn:
    """One Wikidata request at a time in this process; with a Redis client, across every
    replica too (a lock key with a TTL, and a shared pause-until for Retry-After)."""

    def __init__(self, client: Any = None, *, prefix: str = "processor") -> None:
        self._lock = trio.Lock()
        self._client = client
        self._key = f"{prefix}:wikidata:turn"
        self._pause_key = f"{prefix}:wikidata:pause_until"
        self._pause_until = 0.0  # wall time

    async def __aenter__(self) -> Turn:
        await self._lock.acquire()
        try:
            await self._acquire_shared()
            await self._wait_pause()
        except BaseException:
            self._lock.release()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._release_shared()
        finally:
            self._lock.release()

    async def pause(self, seconds: float) -> None:
        until = time.time() + seconds
        self._pause_until = max(self._pause_until, until)
        if self._client is not None:
            try:
                with trio.fail_after(3):
                    await self._client.set(self._pause_key, repr(until), px=max(1, int(seconds * 1000)))
            except Exception:
                pass

    async def _wait_pause(self) -> None:
        until = self._pause_until
        if self._client is not None:
            try:
                with trio.fail_after(3):
                    shared = await self._client.get(self._pause_key)
                until = max(until, float(shared)) if shared else until
            except Exception:
                pass
        wait = until - time.time()
        if wait > 0:
            await trio.sleep(wait)

    async def _acquire_shared(self) -> None:
        if self._client is None:
            return
        self._token = secrets.token_hex(8)
        delay = 0.005
        while True:
            try:
                with trio.fail_after(3):
                    from coredis.tokens import PureToken

                    got = await self._client.set(self._key, self._token, condition=PureToken.NX, px=LOCK_TTL_MS)
            except Exception:
                return  # Redis down: the process lock still holds; the cache fails open too
            if got:
                return
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _release_shared(self) -> None:
        if self._client is None:
            return
        with trio.move_on_after(3, shield=True):
            try:
                await self._client.eval(_RELEASE_LUA, keys=[self._key], args=[self._token])
            except Exception:
                pass


# --- the adapter ------------------------------------------------------------------------------


class WikidataApi:
    """The transport: one `api.php` request, bounded, classified, counted and fed to the
    breaker; a back-off request from Wikidata (maxlag, 429, 503) is `_Pause`."""

    def __init__(self, *, api_url: str, contact: str, request_timeout: float, metrics: ChatMetrics, guard: Guard) -> None:
        self._url = api_url
        self._headers = {"User-Agent": user_agent(contact), "Accept": "application/json"}
        self._request_timeout = request_timeout
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(request_timeout, connect=min(5.0, request_timeout)))
        self._metrics = metrics
        self.guard = guard
        self.requests = 0
        self._log = get_logger("wikidata")

    async def request(self, params: dict[str, str], action: str) -> Any:
        outcome, body, pause = await self._request_once(params, action)
        if outcome != "ok":
            raise _Pause(pause)
        return body

    async def _request_once(self, params: dict[str, str], action: str) -> tuple[str, Any, float]:
        """("ok", body, 0) or ("pause", None, seconds); raises WikidataError otherwise."""
        self.requests += 1
        try:
            resp = None
            with trio.move_on_after(self._request_timeout * 1.5):  # a whole-request bound, not per read
                resp = await self._http.get(self._url, params=params, headers=self._headers)
            if resp is None:
                raise httpx.ReadTimeout("no complete answer in time")
        except httpx.TimeoutException:
            self._record(action, "timeout", Outcome.FAILURE)
            raise WikidataError(f"Wikidata {action} timed out", Fault.TIMEOUT) from None
        except httpx.HTTPError as exc:
            self._record(action, "connection_error", Outcome.FAILURE)
            raise WikidataError(f"Wikidata unreachable: {type(exc).__name__}", Fault.UNREACHABLE) from None
        pause = _retry_after(resp.headers.get("retry-after"))
        if resp.status_code in (429, 503):
            self._record(action, str(resp.status_code), Outcome.IGNORED)
            self._log.info("wikidata_backing_off", status=resp.status_code, seconds=pause)
            return "pause", None, pause
        if resp.status_code != 200:
            self._record(action, str(resp.status_code), Outcome.FAILURE if resp.status_code >= 500 else Outcome.IGNORED)
            raise WikidataError(f"Wikidata {action} answered {resp.status_code}", Fault.SERVER if resp.status_code >= 500 else Fault.INPUT,
                                status=resp.status_code)
        try:
            body = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            self._record(action, "malformed", Outcome.FAILURE)
            raise WikidataError(f"Wikidata {action} answered something that is not JSON", Fault.MALFORMED) from None
        code = wd.error_code(body)
        if code == "maxlag" or code == "ratelimited":
            self._record(action, code, Outcome.IGNORED)
            self._log.info("wikidata_backing_off", error=code, seconds=pause)
            return "pause", None, pause
        if code is not None:
            self._record(action, "error", Outcome.IGNORED)
            raise WikidataError(f"Wikidata {action} error {code}", Fault.INPUT)
        self._record(action, "success", Outcome.SUCCESS)
        return "ok", body, 0.0

    def _record(self, action: str, outcome: str, breaker: Outcome) -> None:
        self._metrics.wikidata_requests.labels(action, outcome).inc()
        self.guard.record(breaker)

    async def aclose(self) -> None:
        await self._http.aclose()


class Wikidata:
    """The lookups over `WikidataApi`: cache first, one request at a time (`Turn`), the
    whole of one result bounded by `timeout`."""

    def __init__(
        self, *, api_url: str, contact: str, language: str, timeout: float, cache: Cache, cache_ttl: float,
        metrics: ChatMetrics, guard: Guard | None = None, turn: Turn | None = None, request_timeout: float | None = None,
    ) -> None:
        # a request once sent is waited for: its own bound keeps the overshoot small
        self._api = WikidataApi(api_url=api_url, contact=contact, request_timeout=request_timeout or min(timeout, 5.0),
                                metrics=metrics, guard=guard or Guard("wikidata", BreakerConfig()))
        self._language = language
        self._timeout = timeout
        self._cache = cache
        self._ttl = cache_ttl
        self._metrics = metrics
        self._turn = turn or Turn()
        self._log = get_logger("wikidata")

    @property
    def guard(self) -> Guard:
        return self._api.guard

    @property
    def requests(self) -> int:
        """Requests sent to Wikidata (statistics)."""
        return self._api.requests

    async def resolve(self, names: Iterable[str], *, people: bool) -> tuple[dict[str, Entity | None], str | None]:
        """The entity of each name that could be settled, and why some could not (None:
        all settled). Bounded by WIKIDATA_TIMEOUT_SECONDS; never raises for Wikidata."""
        wanted = list(dict.fromkeys(names))
        found: dict[str, Entity | None] = {}
        if not wanted:
            return found, None
        reason: str | None = None
        with trio.move_on_after(self._timeout) as scope:
            try:
                await self._resolve(wanted, people, found)
            except BreakerOpen:
                reason = "breaker_open"
            except WikidataError as exc:
                reason = "slow" if exc.fault is Fault.TIMEOUT else "down"
                self._log.warning("wikidata_unavailable", error=str(exc), fault=exc.fault.value)
        if scope.cancelled_caught:
            reason = "slow"
        if reason is not None:
            self._metrics.wikidata_degraded.labels(reason).inc()
        return found, reason

    async def _resolve(self, names: list[str], people: bool, found: dict[str, Entity | None]) -> None:
        lang = self._language
        keys = {n: f"search:{lang}:{wd.normalise(n)}" for n in names}
        cached = await self._cache.get_many(list(dict.fromkeys(keys.values())))
        self._count_cache("search", len(cached), len(set(keys.values())))
        candidates: dict[str, list[Entity]] = {}
        for name in names:
            value = cached.get(keys[name])
            if value is None:
                value = await self._search(name, keys[name])
            candidates[name] = [e for e in map(wd.entity_from_json, value) if e is not None]
            if not people:
                found[name] = wd.best_match(candidates[name], None)
        if people:
            facts = await self._facts([c.id for cands in candidates.values() for c in cands])
            for name in names:
                found[name] = wd.best_match(candidates[name], facts)

    async def _facts(self, ids: list[str]) -> dict[str, wd.Facts]:
        lang = self._language
        unique = list(dict.fromkeys(ids))
        keys = {i: f"facts:{lang}:{i}" for i in unique}
        cached = await self._cache.get_many(list(keys.values()))
        self._count_cache("facts", len(cached), len(unique))
        values = {q: cached[keys[q]] for q in unique if keys[q] in cached}
        for batch in wd.chunks(i for i in unique if i not in values):
            values.update(await self._entities(batch, keys))
        return {q: wd.Facts(q, bool(v[0]), v[1], v[2]) for q, v in values.items() if isinstance(v, list) and len(v) == 3}

    async def _search(self, name: str, key: str) -> Any:
        """The cached search answer for `name`: looked up again inside the turn (a request
        ahead in the queue may have fetched it), else asked of Wikidata and cached."""
        async def attempt() -> Any:
            hit = await self._cache.get_many([key])
            if key in hit:
                return hit[key]
            body = await self._api.request(wd.search_params(name, self._language), "wbsearchentities")
            value = [wd.entity_to_json(e) for e in _read(wd.parse_search, body)]
            await self._cache.put_many({key: value}, self._ttl)
            return value

        return await self._in_turn(attempt)

    async def _entities(self, batch: list[str], keys: Mapping[str, str]) -> dict[str, Any]:
        """Facts of up to 50 items, the ones not cached meanwhile in one `wbgetentities`."""
        lang = self._language

        async def attempt() -> dict[str, Any]:
            hit = await self._cache.get_many([keys[q] for q in batch])
            out = {q: hit[keys[q]] for q in batch if keys[q] in hit}
            missing = [q for q in batch if q not in out]
            if missing:
                body = await self._api.request(wd.entities_params(missing, lang), "wbgetentities")
                got = _read(lambda b: wd.parse_entities(b, lang), body)
                for q in missing:  # an id Wikidata did not return is remembered as "not a person"
                    f = got.get(q, wd.Facts(q, False))
                    out[q] = [f.human, f.label, f.description]
                await self._cache.put_many({keys[q]: out[q] for q in missing}, self._ttl)
            return out

        return await self._in_turn(attempt)

    def _count_cache(self, kind: str, hits: int, total: int) -> None:
        if hits:
            self._metrics.wikidata_cache.labels(kind, "hit").inc(hits)
        if total - hits:
            self._metrics.wikidata_cache.labels(kind, "miss").inc(total - hits)

    async def _in_turn(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` holding the turn (one request at a time). Once it holds the turn,
        the request is waited for even if the caller gives up (shielded, bounded by the
        request timeout): Wikidata never sees two requests of ours at once, and the answer
        still reaches the cache. maxlag / 429 / 503: wait Retry-After, try again."""
        for _ in range(MAX_ATTEMPTS):
            self.guard.check()
            async with self._turn:
                with trio.CancelScope(shield=True):
                    try:
                        return await attempt()
                    except _Pause as p:
                        pause = p.seconds
            await self._turn.pause(pause)
        raise WikidataError(f"Wikidata asked to back off {MAX_ATTEMPTS} times", Fault.BUSY)

    async def aclose(self) -> None:
        await self._api.aclose()
        await self._cache.aclose()


def _read(parse: Callable[[Any], T], body: Any) -> T:
    try:
        return parse(body)
    except wd.Unreadable as exc:
        raise WikidataError(str(exc), Fault.MALFORMED) from None


def _retry_after(value: str | None) -> float:
    try:
        seconds = float(value) if value is not None else DEFAULT_PAUSE
    except ValueError:
        seconds = DEFAULT_PAUSE
    return min(max(seconds, 0.0), 60.0)


class MockWikidata:
    """Offline stand-in for `mock` mode and `demo`: a stable Q-id per name (from a hash),
    every person a human."""

    def __init__(self, metrics: ChatMetrics | None = None) -> None:
        self.requests = 0

    async def resolve(self, names: Iterable[str], *, people: bool) -> tuple[dict[str, Entity | None], str | None]:
        import hashlib

        await trio.lowlevel.checkpoint()
        out: dict[str, Entity | None] = {}
        for name in dict.fromkeys(names):
            n = int.from_bytes(hashlib.sha256(wd.normalise(name).encode()).digest()[:4], "big") % 90_000_000 + 1_000_000
            out[name] = Entity(f"Q{n}", name, "pessoa (simulado)" if people else "tema (simulado)")
        return out, None

    async def aclose(self) -> None:
        return None


class Enricher(Protocol):
    async def resolve(self, names: Iterable[str], *, people: bool) -> tuple[dict[str, Entity | None], str | None]: ...
    async def aclose(self) -> None: ...
