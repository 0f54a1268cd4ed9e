"""The task API client (CONTRACT.md §1).

* Every request carries a bearer token; a 401 drops that token, fetches one new token (one
  fetch however many requests got 401) and retries that request once, never in a loop.
* Requests in flight at once are bounded (`API_CONCURRENCY`).
* The pending list is read as a stream and parsed incrementally (ijson push API), so
  memory does not grow with the list; the caller stops reading when it has enough.
* Metrics label endpoints with route templates, never ids.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import ijson
import orjson
import trio

from processor.effects.auth import TokenError, TokenProvider
from processor.effects.guard import BreakerOpen, Guard, outcome_for_status
from processor.effects.metrics import Metrics
from processor.pure.breaker import Outcome
from processor.pure.retry import ErrorKind, classify_status

PENDING = "/api/ai-tasks/pending"
TASKS = "/api/ai-tasks"
TASK_BY_ID = "/api/ai-tasks/:id"
_JSON = {"Content-Type": "application/json", "Accept": "application/json"}


class ApiError(Exception):
    """A task API call failed.

    `status` is the HTTP status, or None when no answer came (the outcome is unknown: the
    server may have applied the request). `kind` says whether retrying can help.
    """

    def __init__(
        self, message: str, *, status: int | None, kind: ErrorKind, retry_after: float | None = None, sent: bool = True
    ) -> None:
        super().__init__(message)
        self.sent = sent  # False: the request never left (breaker open, no token)
        self.status = status
        self.kind = kind
        self.retry_after = retry_after


class TaskApi:
    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        tokens: TokenProvider,
        *,
        metrics: Metrics,
        guard: Guard,
        concurrency: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = http
        self._transport = transport  # the hot path skips the client's cookie/redirect/auth layers
        self._base = base_url.rstrip("/")
        self._tokens = tokens
        self._metrics = metrics
        self.guard = guard
        self._limit = trio.CapacityLimiter(concurrency)
        self.last_success: float | None = None  # trio time of the last 2xx
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    async def _send(
        self, method: str, path: str, template: str, *, content: bytes | None = None, stream: bool = False
    ) -> httpx.Response:
        try:
            self.guard.check()
        except BreakerOpen as exc:
            raise ApiError(str(exc), status=None, kind=ErrorKind.RETRYABLE, retry_after=None, sent=False) from None
        async with self._limit:
            for attempt in (0, 1):
                try:
                    token = await self._tokens.get()
                except TokenError as exc:
                    kind = ErrorKind.PERMANENT if exc.permanent else ErrorKind.RETRYABLE
                    raise ApiError(str(exc), status=None, kind=kind, sent=False) from None
                headers = {**_JSON, "Authorization": f"Bearer {token}"}
                t0 = trio.current_time()
                self.guard.note_request()
                try:
                    request = self._http.build_request(method, self._base + path, content=content, headers=headers)
                    if self._transport is not None and not stream:
                        resp = await self._transport.handle_async_request(request)
                        await resp.aread()
                    else:
                        resp = await self._http.send(request, stream=stream)
                except httpx.HTTPError as exc:
                    self._observe(template, method, "error", t0)
                    self.guard.record(Outcome.FAILURE)
                    raise ApiError(f"{method} {template}: {type(exc).__name__}", status=None, kind=ErrorKind.RETRYABLE) from None
                self._observe(template, method, str(resp.status_code), t0)
                if resp.status_code == 401 and attempt == 0:
                    await resp.aclose()
                    self._tokens.invalidate(token)
                    continue
                self.guard.record(outcome_for_status(resp.status_code))
                if resp.status_code < 400:
                    self.last_success = trio.current_time()
                return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _observe(self, template: str, method: str, status: str, t0: float) -> None:
        key = (template, method, status)
        children = self._children.get(key)
        if children is None:  # label lookups cost more than the update itself: cache them
            children = self._children[key] = (
                self._metrics.api_requests.labels(template, method, status),
                self._metrics.api_duration.labels(template, method),
            )
        children[0].inc()
        children[1].observe(trio.current_time() - t0)

    @staticmethod
    async def _raise_for(resp: httpx.Response, what: str) -> None:
        if resp.status_code < 400:
            return
        body = (await resp.aread())[:300].decode("utf-8", "replace") if not resp.is_closed else ""
        retry_after = _retry_after(resp)
        raise ApiError(
            f"{what}: HTTP {resp.status_code} {body}".strip(),
            status=resp.status_code,
            kind=classify_status(resp.status_code),
            retry_after=retry_after,
        )

    async def patch(self, task_id: str, state: str, result: Any = None, *, include_result: bool = False, reason: str | None = None) -> None:
        """PATCH /api/ai-tasks/:id. Raises ApiError unless the API answered 2xx."""
        body: dict[str, Any] = {"state": state}
        if include_result:
            body["result"] = result
        if reason is not None:
            # The contract names no field for it (unknown fields are ignored): send the
            # reason under both names in use, so that either kind of API keeps it.
            body["reason"] = reason
            body["error"] = reason
        resp = await self._send("PATCH", f"{TASKS}/{task_id}", TASK_BY_ID, content=orjson.dumps(body))
        try:
            await self._raise_for(resp, f"PATCH {task_id} state={state}")
        finally:
            await resp.aclose()

    @asynccontextmanager
    async def pending(self) -> AsyncIterator[AsyncIterator[Any]]:
        """The pending list as an async iterator of raw entries, read as a stream."""
        async with self._stream(PENDING, PENDING) as items:
            yield items

    @asynccontextmanager
    async def by_state(self, state: str) -> AsyncIterator[AsyncIterator[Any]]:
        async with self._stream(f"{TASKS}?state={state}", TASKS) as items:
            yield items

    @asynccontextmanager
    async def _stream(self, path: str, template: str) -> AsyncIterator[AsyncIterator[Any]]:
        resp = await self._send("GET", path, template, stream=True)
        try:
            await self._raise_for(resp, f"GET {template}")
            items = _items(resp, template)
            try:
                yield items
            finally:
                await items.aclose()
        finally:
            await resp.aclose()


async def _items(resp: httpx.Response, what: str) -> AsyncGenerator[Any, None]:
    events = ijson.sendable_list()
    coro = ijson.items_coro(events, "item", use_float=True)
    try:
        async for chunk in resp.aiter_bytes():
            coro.send(chunk)
            if events:
                batch = list(events)
                del events[:]
                for obj in batch:
                    yield obj
        coro.close()
    except ijson.JSONError as exc:
        raise ApiError(f"GET {what}: body is not valid JSON ({exc})", status=resp.status_code, kind=ErrorKind.RETRYABLE) from None
    except httpx.HTTPError as exc:
        raise ApiError(f"GET {what}: stream broken ({type(exc).__name__})", status=None, kind=ErrorKind.RETRYABLE) from None
    for obj in events:
        yield obj


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
