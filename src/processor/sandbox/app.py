"""A local stand-in for the task API and its OAuth2 server (CONTRACT.md §1 and §2).

Faithful to the letter, awkward parts included: the pending list holds *every* pending task
(no pagination; `?limit=` is ignored), ids are ObjectIds (400 otherwise), 404 for unknown
ids, PATCH is unconditional, a result over 10 MiB is 400, every route needs a valid bearer
token (401 otherwise), tokens expire. It must never be more forgiving than the real API.

Beyond the contract, for tests and benchmarks only, `/_sandbox/*` routes seed tasks, read
counters, inject faults and revoke tokens. This is a development tool, not the product.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import random
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote

import attrs
import orjson
import trio

from processor.effects.asgi import lifespan
from processor.pure.tasks import OBJECT_ID

STATES = ("pending", "in_progress", "succeeded", "failed")
MAX_RESULT_BYTES = 10 * 1024 * 1024
MAX_BODY_BYTES = MAX_RESULT_BYTES + 1024 * 1024
TASKS_PREFIX = "/api/ai-tasks"
STREAM_CHUNK_TASKS = 200

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(t * 1000) % 1000:03d}Z"


@attrs.define
class Fault:
    """Fail the next `count` calls (None: all), each with probability `probability`."""

    status: int = 503
    count: int | None = None
    probability: float = 1.0
    latency: float = 0.0
    apply: bool = False  # carry the request out, then answer `status` anyway
    drop: bool = False  # close the connection without an answer
    only_state: str | None = None  # PATCH only: fault only bodies with this `state`


@attrs.define
class PatchRecord:
    task_id: str
    state: str
    at: float
    body: dict[str, Any]


@attrs.define
class SandboxState:
    client_id: str = "sandbox-client"
    client_secret: str = "sandbox-secret"
    token_lifetime: float = 3600.0
    clock: Callable[[], float] = time.time
    tasks: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    pending: dict[str, None] = attrs.field(factory=dict)  # insertion order = oldest first
    tokens: dict[str, float] = attrs.field(factory=dict)
    requests: Counter[tuple[str, int]] = attrs.field(factory=Counter)
    request_log: deque[tuple[float, str, int]] = attrs.field(factory=lambda: deque(maxlen=200_000))
    patches: list[PatchRecord] = attrs.field(factory=list)
    patch_counts: Counter[str] = attrs.field(factory=Counter)
    callbacks: Counter[str] = attrs.field(factory=Counter)  # succeeded+result dispatches
    callback_results: dict[str, set[str]] = attrs.field(factory=dict)
    faults: dict[str, Fault] = attrs.field(factory=dict)
    token_requests: int = 0
    first_token_at: float | None = None
    last_patch_at: float | None = None
    rng: random.Random = attrs.field(factory=lambda: random.Random(1234))
    keep_patch_bodies: bool = False
    _counter: itertools.count = attrs.field(factory=lambda: itertools.count(random.randrange(1 << 24)))

    # -- ids and tasks --------------------------------------------------------------
    def new_id(self) -> str:
        ts = int(self.clock()) & 0xFFFFFFFF
        return f"{ts:08x}{os.urandom(5).hex()}{next(self._counter) & 0xFFFFFF:06x}"

    def create(self, entry: dict[str, Any]) -> dict[str, Any]:
        now = iso(self.clock())
        task = {
            "_id": self.new_id(),
            "type": entry.get("type", "text_embedding"),
            "state": "pending",
            "content": entry.get("content"),
            "callbackRoute": entry.get("callbackRoute", "verification_update_embedding"),
            "callbackParams": entry.get("callbackParams", {"targetId": secrets.token_hex(12), "field": "embedding"}),
            "createdAt": now,
            "updatedAt": now,
            "__v": 0,
        }
        self.tasks[task["_id"]] = task
        self.pending[task["_id"]] = None
        return task

    def insert_raw(self, raw: Any) -> None:
        """Put a raw (possibly malformed) entry straight into the pending list."""
        key = raw.get("_id") if isinstance(raw, dict) and isinstance(raw.get("_id"), str) else None
        key = key or f"raw-{next(self._counter)}"
        self.tasks[key] = raw
        self.pending[key] = None

    def seed(self, n: int, *, text_size: int = 60, model: str | None = None, prefix: str = "claim") -> list[str]:
        ids = []
        for i in range(n):
            text = f"{prefix} {i}: " + ("lorem ipsum dolor sit amet " * (text_size // 27 + 1))
            content: Any = {"text": text[:text_size], "model": model} if model else text[:text_size]
            ids.append(self.create({"type": "text_embedding", "content": content})["_id"])
        return ids

    def seed_malformed(self) -> dict[str, str]:
        """One entry of each malformed kind; returns {kind: id} for those that have an id."""
        out = {}
        self.insert_raw({"type": "text_embedding", "state": "pending", "content": "no id here"})
        for kind, content in (
            ("null_content", None),
            ("number_content", 42),
            ("empty_text", {"text": "", "model": "nomic-embed-text"}),
            ("too_long", {"text": "x" * 10_001, "model": "nomic-embed-text"}),
            ("unknown_model", {"text": "hello", "model": "no-such-model"}),
        ):
            out[kind] = self.create({"type": "text_embedding", "content": content})["_id"]
        out["unknown_type"] = self.create({"type": "image_caption", "content": "a cat"})["_id"]
        return out

    def by_state(self) -> Counter[str]:
        return Counter(t.get("state", "?") for t in self.tasks.values() if isinstance(t, dict))

    def stats(self) -> dict[str, Any]:
        return {
            "states": dict(self.by_state()),
            "requests": {f"{r} {s}": n for (r, s), n in sorted(self.requests.items())},
            "token_requests": self.token_requests,
            "first_token_at": self.first_token_at,
            "last_patch_at": self.last_patch_at,
            "patches": len(self.patches),
            "max_patches_per_task": max(self.patch_counts.values(), default=0),
            "callbacks": sum(self.callbacks.values()),
            "tasks_with_repeat_callbacks": sum(1 for n in self.callbacks.values() if n > 1),
            "tasks_with_conflicting_results": sum(1 for s in self.callback_results.values() if len(s) > 1),
        }

    # -- auth --------------------------------------------------------------------------
    def issue_token(self) -> dict[str, Any]:
        token = "sbx_" + secrets.token_urlsafe(24)
        self.tokens[token] = self.clock() + self.token_lifetime
        return {"access_token": token, "token_type": "bearer", "expires_in": int(self.token_lifetime), "scope": "read write"}

    def token_valid(self, token: str) -> bool:
        exp = self.tokens.get(token)
        return exp is not None and self.clock() < exp

    def revoke_all(self) -> None:
        self.tokens.clear()


class SandboxApp:
    """The ASGI application."""

    def __init__(self, state: SandboxState | None = None) -> None:
        self.state = state or SandboxState()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        route = _route_name(method, path)
        body = await _read_body(receive)
        fault = self._take_fault(route, body)
        if fault is not None and fault.latency:
            await trio.sleep(fault.latency)
        if fault is not None and fault.drop:
            self._count(route, 0)
            raise ConnectionAbortedError("sandbox fault: connection dropped")
        if fault is not None and not fault.apply and fault.status:
            await self._send_json(send, route, fault.status, {"statusCode": fault.status, "message": "injected fault"})
            return
        status, payload, stream = await self._dispatch(scope, method, path, body)
        if fault is not None and fault.apply and fault.status:
            status, payload, stream = fault.status, {"statusCode": fault.status, "message": "injected fault"}, None
        if stream is not None:
            self._count(route, status)
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
            for chunk in stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await trio.lowlevel.checkpoint()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await self._send_json(send, route, status, payload)

    def _count(self, route: str, status: int) -> None:
        self.state.requests[(route, status)] += 1
        self.state.request_log.append((self.state.clock(), route, status))

    def _take_fault(self, route: str, body: bytes) -> Fault | None:
        fault = self.state.faults.get(route) or self.state.faults.get("*")
        if fault is None or route == "admin":
            return None
        if fault.only_state is not None:
            try:
                wanted = orjson.loads(body).get("state") == fault.only_state
            except (orjson.JSONDecodeError, AttributeError):
                wanted = False
            if not wanted:
                return None
        if fault.count is not None:
            if fault.count <= 0:
                return None
        if self.state.rng.random() >= fault.probability:
            return None
        if fault.count is not None:
            fault.count -= 1
        return fault

    async def _send_json(self, send: Send, route: str, status: int, payload: Any) -> None:
        self._count(route, status)
        data = orjson.dumps(payload)
        await send({
            "type": "http.response.start", "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        })
        await send({"type": "http.response.body", "body": data})

    async def _dispatch(self, scope: Scope, method: str, path: str, body: bytes):
        st = self.state
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path == "/oauth2/token" and method == "POST":
            return (*self._token(headers, body), None)
        if path.startswith("/_sandbox/"):
            return (*self._admin(method, path, body), None)
        if not path.startswith(TASKS_PREFIX):
            return 404, {"statusCode": 404, "message": f"Cannot {method} {path}"}, None
        auth = headers.get("authorization", "")
        if not auth.lower().startswith("bearer ") or not st.token_valid(auth[7:].strip()):
            return 401, {"statusCode": 401, "message": "Unauthorized"}, None
        rest = path[len(TASKS_PREFIX):]
        query = parse_qs(scope.get("query_string", b"").decode())
        if rest == "/pending" and method == "GET":
            snapshot = [st.tasks[i] for i in st.pending]
            return 200, None, _stream_array(snapshot)
        if rest in ("", "/") and method == "GET":
            wanted = query.get("state", [None])[0]
            items = [t for t in st.tasks.values() if isinstance(t, dict) and (wanted is None or t.get("state") == wanted)]
            return 200, None, _stream_array(items)
        if rest in ("", "/") and method == "POST":
            try:
                entry = orjson.loads(body)
            except orjson.JSONDecodeError:
                return 400, {"statusCode": 400, "message": "invalid JSON"}, None
            if not isinstance(entry, dict) or "type" not in entry:
                return 400, {"statusCode": 400, "message": "type is required"}, None
            return 201, st.create(entry), None
        if rest.startswith("/") and method == "PATCH":
            return (*self._patch(unquote(rest[1:]), body), None)
        return 404, {"statusCode": 404, "message": f"Cannot {method} {path}"}, None

    def _token(self, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        st = self.state
        st.token_requests += 1
        if st.first_token_at is None:
            st.first_token_at = time.time()
        if "application/x-www-form-urlencoded" not in headers.get("content-type", ""):
            return 400, {"error": "invalid_request", "error_description": "expected a form body"}
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type", "error_description": "only client_credentials"}
        client_id = secret = None
        auth = headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(auth[6:]).decode()
                client_id, _, secret = decoded.partition(":")
                client_id, secret = unquote(client_id), unquote(secret)
            except (ValueError, UnicodeDecodeError):
                return 401, {"error": "invalid_client", "error_description": "malformed basic credentials"}
        elif "client_id" in form:
            client_id, secret = form.get("client_id"), form.get("client_secret")
        if client_id != st.client_id or secret != st.client_secret:
            return 401, {"error": "invalid_client", "error_description": "Client authentication failed"}
        scopes = set(form.get("scope", "").split())
        if not scopes <= {"read", "write"}:
            return 400, {"error": "invalid_scope", "error_description": f"scope not allowed: {' '.join(sorted(scopes))}"}
        return 200, st.issue_token()

    def _patch(self, task_id: str, body: bytes) -> tuple[int, Any]:
        st = self.state
        if not OBJECT_ID.match(task_id):
            return 400, {"statusCode": 400, "message": "Invalid ObjectId"}
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return 400, {"statusCode": 400, "message": "invalid JSON"}
        if not isinstance(data, dict) or data.get("state") not in STATES:
            return 400, {"statusCode": 400, "message": f"state must be one of {', '.join(STATES)}"}
        has_result = "result" in data
        result_bytes = orjson.dumps(data["result"]) if has_result else b""
        if len(result_bytes) > MAX_RESULT_BYTES:
            return 400, {"statusCode": 400, "message": "result is larger than 10 MiB"}
        task = st.tasks.get(task_id)
        if not isinstance(task, dict):
            return 404, {"statusCode": 404, "message": f"AI task {task_id} not found"}
        state = data["state"]
        now = st.clock()
        task["state"] = state
        if has_result:
            task["result"] = data["result"]
        task["updatedAt"] = iso(now)
        task["__v"] = task.get("__v", 0) + 1
        if state == "pending":
            st.pending[task_id] = None
        else:
            st.pending.pop(task_id, None)
        st.patch_counts[task_id] += 1
        st.last_patch_at = time.time()
        st.patches.append(PatchRecord(task_id, state, now, data if st.keep_patch_bodies else {k: v for k, v in data.items() if k != "result"}))
        if state == "succeeded" and has_result:
            st.callbacks[task_id] += 1
            st.callback_results.setdefault(task_id, set()).add(hashlib.sha1(result_bytes).hexdigest())
        return 200, task

    def _admin(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        st = self.state
        data = orjson.loads(body) if body else {}
        if path == "/_sandbox/stats":
            return 200, st.stats()
        if path == "/_sandbox/seed" and method == "POST":
            ids = st.seed(int(data.get("count", 10)), text_size=int(data.get("text_size", 60)), model=data.get("model"))
            extra = st.seed_malformed() if data.get("malformed") else {}
            return 200, {"ids": ids if data.get("return_ids") else len(ids), "malformed": extra}
        if path == "/_sandbox/faults" and method == "POST":
            route = data.pop("route", "*")
            if data.get("clear"):
                st.faults.pop(route, None) if route != "*" else st.faults.clear()
            else:
                st.faults[route] = Fault(**data)
            return 200, {"faults": list(st.faults)}
        if path == "/_sandbox/revoke" and method == "POST":
            st.revoke_all()
            return 200, {"revoked": True}
        if path == "/_sandbox/clients" and method == "POST":
            st.client_secret = data.get("client_secret", st.client_secret)
            return 200, {"client_id": st.client_id}
        if path == "/_sandbox/claims":
            return 200, [[p.task_id, p.state, p.at] for p in st.patches]
        return 404, {"statusCode": 404, "message": "unknown sandbox route"}


def _route_name(method: str, path: str) -> str:
    if path == "/oauth2/token":
        return "token"
    if path == f"{TASKS_PREFIX}/pending":
        return "pending"
    if path.startswith(f"{TASKS_PREFIX}/") and method == "PATCH":
        return "patch"
    if path.rstrip("/") == TASKS_PREFIX:
        return "list" if method == "GET" else "create"
    return "admin" if path.startswith("/_sandbox/") else "other"


def _stream_array(items: list[Any]):
    """Serialise a JSON array in chunks, as the body of a streamed response."""
    if not items:
        yield b"[]"
        return
    for i in range(0, len(items), STREAM_CHUNK_TASKS):
        part = items[i : i + STREAM_CHUNK_TASKS]
        data = orjson.dumps(part)
        yield (b"[" if i == 0 else b",") + data[1:-1]
    yield b"]"


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            chunks.append(chunk)
        if not msg.get("more_body"):
            break
    return b"".join(chunks)
