"""The task API client (CONTRACT.md §1).

* Every request carries a bearer token; a 401 drops that token, fetches one new token (one
  fetch however many requests got 401) and retries that request once, never in a loop.
* Requests in flight at once are bounded (`API_CONCURRENCY`).
* The pending list is read as a stream and parsed incrementally, one element at a time
  (`processor.pure.jsonstream`), so memory does not grow with the list and a bad value
  (a huge integer, a lone surrogate) spoils its own entry only; the caller stops reading
  when it has enough. A body that is not a JSON array, or is cut off, is an `ApiError`
  (fault MALFORMED), never "nothing pending", and does not count as an answer for /ready.
* Nothing foreign gets out: every failure (httpx errors, a URL or header that cannot be
  built) becomes an `ApiError` with a `kind` (what retrying can do) and a `fault`.
* Metrics label endpoints with route templates, never ids.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import httpx
import orjson
import trio

from processor.effects.auth import TokenError, TokenProvider
from processor.effects.guard import BreakerOpen, Guard, outcome_for_status
from processor.effects.http import Http1Lane, LaneError
from processor.effects.metrics import Metrics
from processor.pure.breaker import Outcome
from processor.pure.faults import Dependency, Fault
from processor.pure.jsonstream import ArraySplitter, MalformedBody, decode_element, printable
from processor.pure.retry import ErrorKind, classify_status
from processor.pure.tasks import is_object_id

PENDING = "/api/ai-tasks/pending"
TASKS = "/api/ai-tasks"
TASK_BY_ID = "/api/ai-tasks/:id"
_JSON = {"Content-Type": "application/json", "Accept": "application/json"}
_JSON_B = ((b"Content-Type", b"application/json"), (b"Accept", b"application/json"))
_STATUS = {200: "200", 201: "201", 204: "204", 401: "401", 404: "404"}  # metric label, no str() per request


class _Answer(NamedTuple):
    status: int
    body: bytes  # empty for a 2xx (the API echoes the task; nobody reads it)
    retry_after: str | None


class ApiError(Exception):
    """A task API call failed.

    `status` is the HTTP status, or None when no answer came (the outcome is unknown: the
    server may have applied the request). `kind` says whether retrying can help, `fault`
    what went wrong (`processor.pure.faults`).
    """

    dependency = Dependency.TASK_API

    def __init__(
        self,
        message: str,
        *,
        status: int | None,
        kind: ErrorKind,
        retry_after: float | None = None,
        sent: bool = True,
        fault: Fault | None = None,
    ) -> None:
        super().__init__(message)
        self.sent = sent  # False: the request never left (breaker open, no token)
        self.status = status
        self.kind = kind
        self.retry_after = retry_after
        self.fault = fault if fault is not None else fault_for_status(status)


def fault_for_status(status: int | None) -> Fault:
    """The task API's answer, classified (the one place that reads its statuses)."""
    if status is None:
        return Fault.UNREACHABLE
    if status == 401:
        return Fault.TOKEN_EXPIRED
    if status == 403:
        return Fault.AUTH  # this client may not do that: a permission to fix, never a refused result
    if status == 404:
        return Fault.NOT_FOUND
    if status == 429:
        return Fault.RATE_LIMITED
    if status == 503:
        return Fault.BUSY
    if status == 408:
        return Fault.TIMEOUT
    if status >= 500:
        return Fault.SERVER
    if status == 413:
        return Fault.INPUT  # our request was too large: retrying will not help
    if status == 400:
        return Fault.REFUSED  # the API (or its callback) refused it: a `succeeded` may already be saved
    if status >= 400:
        return Fault.AUTH  # 405/409/422...: a proxy or gateway said no; a setting to fix, never the task's defect
    return Fault.MALFORMED


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
        lane: Http1Lane | None = None,
    ) -> None:
        self._http = http
        self._lane = lane  # the PATCHes: h11 keep-alive connections, prebuilt headers (effects/http.py)
        self._base = base_url.rstrip("/")
        self._lane_token: str | None = None
        self._lane_headers: list[tuple[bytes, bytes]] = []
        self._tokens = tokens
        self._metrics = metrics
        self.guard = guard
        self._limit = trio.CapacityLimiter(concurrency)
        self.last_success: float | None = None  # trio time of the last 2xx PATCH or readable pending list
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    async def _send(
        self, method: str, path: str, template: str, *, content: bytes | None = None, stream: bool = False
    ) -> httpx.Response:
        try:
            self.guard.check()
        except BreakerOpen as exc:
            raise ApiError(str(exc), status=None, kind=ErrorKind.RETRYABLE, retry_after=None, sent=False, fault=Fault.UNREACHABLE) from None
        async with self._limit:
            for attempt in (0, 1):
                try:
                    token = await self._tokens.get()
                except TokenError as exc:
                    kind = ErrorKind.PERMANENT if exc.permanent else ErrorKind.RETRYABLE
                    raise ApiError(str(exc), status=None, kind=kind, sent=False, fault=Fault.AUTH) from None
                headers = {**_JSON, "Authorization": f"Bearer {token}"}
                try:
                    request = self._http.build_request(method, self._base + path, content=content, headers=headers)
                except Exception as exc:  # InvalidURL, a header that is not ASCII, ...: nothing was sent
                    raise ApiError(
                        f"{method} {template}: cannot build the request ({type(exc).__name__}: {printable(str(exc), 200)})",
                        status=None, kind=ErrorKind.PERMANENT, sent=False, fault=Fault.INPUT,
                    ) from None
                t0 = trio.current_time()
                self.guard.note_request()
                try:
                    resp = await self._http.send(request, stream=stream)
                except Exception as exc:  # httpx errors, and anything else below us: outcome unknown
                    self._observe(template, method, "error", t0)
                    self.guard.record(Outcome.FAILURE)
                    fault = Fault.TIMEOUT if isinstance(exc, httpx.TimeoutException) else Fault.UNREACHABLE
                    raise ApiError(f"{method} {template}: {type(exc).__name__}", status=None, kind=ErrorKind.RETRYABLE, fault=fault) from None
                self._observe(template, method, str(resp.status_code), t0)
                if resp.status_code == 401 and attempt == 0:
                    await _close(resp)
                    self._tokens.invalidate(token)
                    continue
                self.guard.record(outcome_for_status(resp.status_code))
                if resp.status_code < 400 and not stream:
                    self.last_success = trio.current_time()  # a stream counts once its body was readable
                return resp
        raise AssertionError("unreachable")  # pragma: no cover

    async def _request(self, method: str, path: str, template: str, content: bytes | dict[str, Any]) -> _Answer:
        """A whole (non-streamed) exchange: breaker, concurrency bound, token, one 401
        refresh. Through the lane when there is one; every failure becomes an ApiError.
        A dict `content` is encoded as JSON only once a concurrency slot is held: a
        report waiting for its turn does not hold its encoded body (a vector's JSON) too."""
        lane = self._lane
        if lane is None:
            hresp = await self._send(method, path, template, content=_encoded(content))
            try:
                body = await hresp.aread() if hresp.status_code >= 400 else b""
            except Exception as exc:  # the error body itself broke off
                body = f"(body unreadable: {type(exc).__name__})".encode()
            finally:
                await _close(hresp)
            return _Answer(hresp.status_code, body, hresp.headers.get("retry-after"))
        try:
            self.guard.check()
        except BreakerOpen as exc:
            raise ApiError(str(exc), status=None, kind=ErrorKind.RETRYABLE, retry_after=None, sent=False, fault=Fault.UNREACHABLE) from None
        method_b, target = method.encode(), path.encode()
        try:
            self._limit.acquire_nowait()  # no scheduler round trip when a slot is free (the request checkpoints anyway)
        except trio.WouldBlock:
            await self._limit.acquire()
        try:
            return await self._lane_exchange(lane, method, method_b, target, template, _encoded(content))
        finally:
            self._limit.release()

    async def _lane_exchange(self, lane: Http1Lane, method: str, method_b: bytes, target: bytes, template: str, content: bytes) -> _Answer:
        """One request through the lane, with one token refresh on 401."""
        for attempt in (0, 1):
            try:
                token = await self._tokens.get()
            except TokenError as exc:
                kind = ErrorKind.PERMANENT if exc.permanent else ErrorKind.RETRYABLE
                raise ApiError(str(exc), status=None, kind=kind, sent=False, fault=Fault.AUTH) from None
            if token is not self._lane_token:  # header list built once per token
                self._lane_headers = [*lane.base_headers(), *_JSON_B, (b"Authorization", b"Bearer " + token.encode())]
                self._lane_token = token
            t0 = trio.current_time()
            self.guard.note_request()
            try:
                resp = await lane.request(method_b, target, self._lane_headers, content)
            except LaneError as exc:
                if not exc.sent:  # a header (the token) or target h11 refuses: nothing was sent
                    raise ApiError(f"{method} {template}: cannot build the request ({exc})", status=None,
                                   kind=ErrorKind.PERMANENT, sent=False, fault=Fault.INPUT) from None
                self._observe(template, method, "error", t0)
                self.guard.record(Outcome.FAILURE)
                what, fault = ("Timeout", Fault.TIMEOUT) if exc.timeout else (str(exc), Fault.UNREACHABLE)
                raise ApiError(f"{method} {template}: {what}", status=None, kind=ErrorKind.RETRYABLE, fault=fault) from None
            status = resp.status
            self._observe(template, method, _STATUS.get(status) or str(status), t0)
            if status == 401 and attempt == 0:
                self._tokens.invalidate(token)
                continue
            self.guard.record(outcome_for_status(status))
            if status < 400:
                self.last_success = trio.current_time()
                return _Answer(status, b"", None)
            return _Answer(status, resp.body, resp.header(b"retry-after"))
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
        try:
            body = (await resp.aread())[:300].decode("utf-8", "replace") if not resp.is_closed else ""
        except Exception as exc:  # the error body itself broke off
            body = f"(body unreadable: {type(exc).__name__})"
        retry_after = _retry_after(resp)
        raise ApiError(
            f"{what}: HTTP {resp.status_code} {body}".strip(),
            status=resp.status_code,
            kind=classify_status(resp.status_code),
            retry_after=retry_after,
        )

    async def patch(self, task_id: str, state: str, result: Any = None, *, include_result: bool = False, reason: str | None = None) -> None:
        """PATCH /api/ai-tasks/:id. Raises ApiError unless the API answered 2xx."""
        if not is_object_id(task_id):
            # what the API answers for such an id; never sent (it may not even form a URL)
            raise ApiError(
                f"PATCH {printable(str(task_id), 40)!r}: not a 24-hex ObjectId", status=400,
                kind=ErrorKind.PERMANENT, sent=False, fault=Fault.REFUSED,
            )
        body: dict[str, Any] = {"state": state}
        if include_result:
            body["result"] = result
        if reason is not None:
            # The contract names no field for it (unknown fields are ignored): send the
            # reason under both names in use, so that either kind of API keeps it.
            body["reason"] = reason
            body["error"] = reason
        answer = await self._request("PATCH", f"{TASKS}/{task_id}", TASK_BY_ID, body)
        if answer.status >= 400:
            text = answer.body[:300].decode("utf-8", "replace")
            raise ApiError(
                f"PATCH {task_id} state={state}: HTTP {answer.status} {text}".strip(),
                status=answer.status,
                kind=classify_status(answer.status),
                retry_after=_parse_retry_after(answer.retry_after),
            )

    @asynccontextmanager
    async def pending(self) -> AsyncIterator[AsyncIterator[Any]]:
        """The pending list as an async iterator of raw entries, read as a stream."""
        async with self._stream(PENDING, PENDING, counts=True) as items:
            yield items

    @asynccontextmanager
    async def by_state(self, state: str) -> AsyncIterator[AsyncIterator[Any]]:
        async with self._stream(f"{TASKS}?state={state}", TASKS) as items:
            yield items

    @asynccontextmanager
    async def _stream(self, path: str, template: str, *, counts: bool = False) -> AsyncIterator[AsyncIterator[Any]]:
        """`counts`: a readable body counts as an answer for `last_success` (/ready). Only the
        pending list does: another list that reads fine says nothing about the intake."""
        resp = await self._send("GET", path, template, stream=True)
        try:
            await self._raise_for(resp, f"GET {template}")
            reader = _ArrayReader(resp, f"GET {template}")
            items = reader.items()
            try:
                yield items
            finally:
                await items.aclose()
            if reader.readable and counts:
                # the body was a JSON array as far as it was read (the caller may stop early)
                self.last_success = trio.current_time()
        finally:
            await _close(resp)


def _encoded(content: bytes | dict[str, Any]) -> bytes:
    return content if isinstance(content, bytes) else orjson.dumps(content)


class _ArrayReader:
    """The entries of a streamed JSON array body, each decoded on its own."""

    def __init__(self, resp: httpx.Response, what: str) -> None:
        self._resp = resp
        self._what = what
        self.readable = False  # the array opened and nothing went wrong so far

    def _malformed(self, exc: MalformedBody) -> ApiError:
        self.readable = False
        return ApiError(
            f"{self._what}: {exc} (HTTP {self._resp.status_code}, content-type "
            f"{printable(self._resp.headers.get('content-type', 'none'), 60)!r})",
            status=self._resp.status_code, kind=ErrorKind.RETRYABLE, fault=Fault.MALFORMED,
        )

    async def items(self) -> AsyncGenerator[Any, None]:
        splitter = ArraySplitter()
        try:
            async for chunk in self._resp.aiter_bytes():
                try:
                    elements = splitter.feed(chunk)
                except MalformedBody as exc:
                    raise self._malformed(exc) from None
                self.readable = True
                for raw in elements:
                    yield decode_element(raw)
            try:
                splitter.close()
            except MalformedBody as exc:
                raise self._malformed(exc) from None
            self.readable = True
        except ApiError:
            raise
        except Exception as exc:  # the stream broke off (httpx errors, decoding of the transfer)
            self.readable = False
            raise ApiError(
                f"{self._what}: stream broken ({type(exc).__name__})", status=None,
                kind=ErrorKind.RETRYABLE, fault=Fault.UNREACHABLE,
            ) from None


async def _close(resp: httpx.Response) -> None:
    try:
        await resp.aclose()
    except Exception:  # closing a broken stream: nothing left to tell
        pass


def _retry_after(resp: httpx.Response) -> float | None:
    return _parse_retry_after(resp.headers.get("retry-after"))


def _parse_retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None
