"""A local stand-in for the task API and its OAuth2 server (CONTRACT.md §1 and §2).

Faithful to the letter, awkward parts included: the pending list holds *every* pending task
(no pagination; `?limit=` is ignored), ids are ObjectIds (400 otherwise), 404 for unknown
ids, PATCH is unconditional, a result over 10 MiB is 400, every route needs a valid bearer
token (401 otherwise), tokens expire. It must never be more forgiving than the real API.

Beyond the contract, for tests and benchmarks only, `/_sandbox/*` routes seed tasks, read
counters, inject faults and revoke tokens. This is a development tool, not the product.

The hostile world (issue 11): everything the real peers may legally send, switchable by a
test, in-process (Python API) or over HTTP (`/_sandbox/*`, JSON). docs/hostile.md lists it all.

* Raw entries: `state.insert_raw_bytes(b'{"_id": "...", "content": "a\\ud800"}', key=...)`
  puts bytes verbatim into the pending list (lone surrogates, integers >= 2**63, deep
  nesting, any JSON value) - served as bytes, never re-encoded. Values inside an ordinary
  task may be `orjson.Fragment(b"...")` for the same effect on one field.
* The pending body's shape: `state.pending_shape = PendingShape(mode="raw"|"wrap"|"list",
  raw=b"...", truncate_at=N, drip_bytes=K, drip_interval=s, status=200, content_type=...)`
  (`{}`, `null`, `{"data": [...]}`, a 200 with HTML, a body cut after N bytes, a slow drip).
* Token answers: `state.token_answer = TokenAnswer(fields={"expires_in": b"NaN"},
  drop=("token_type",), raw=None, count=None)`: raw JSON per field, or the whole body.
* Faults at every step: `state.faults[route] = Fault(...)` (or a list of them), route one of
  `token`, `pending`, `list`, `claim` (PATCH in_progress), `report` (PATCH succeeded or
  failed), `release` (PATCH pending), `patch` (any PATCH), `*`. A fault answers a status
  (with a raw `body`), drops the connection (`drop`), hangs (`hang` seconds, then drops), adds
  `latency`, or applies the request first (`apply`).
* `state.calm()` switches every fault and hostile shape off (POST `/_sandbox/calm`).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import random
import re
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote

import attrs
import orjson
import trio

from processor.effects.asgi import lifespan

STATES = ("pending", "in_progress", "succeeded", "failed")
MAX_RESULT_BYTES = 10 * 1024 * 1024
MAX_BODY_BYTES = MAX_RESULT_BYTES + 1024 * 1024
TASKS_PREFIX = "/api/ai-tasks"
STREAM_CHUNK_TASKS = 200
# The real API's check (Mongo's ObjectId): exactly 24 lowercase hex characters, nothing after.
OBJECT_ID_RE = re.compile(r"[0-9a-f]{24}")
PATCH_ROUTES = {"in_progress": "claim", "succeeded": "report", "failed": "report", "pending": "release"}

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
    latency: float = 0.0  # a request carried out after its latency is carried out even if the client leaves
    apply: bool = False  # carry the request out, then answer `status` anyway
    drop: bool = False  # break the connection before the answer (with `apply`: after carrying the request out)
    only_state: str | None = None  # PATCH only: fault only bodies with this `state`
    body: bytes | None = None  # answer these raw bytes (with `status`) instead of the JSON message
    content_type: str = "application/json"
    hang: float = 0.0  # wait this long (the client may give up first), then drop the connection
    fired: int = attrs.field(default=0, repr=False)  # how many times it fired

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        data = dict(data)
        if isinstance(data.get("body"), str):
            data["body"] = data["body"].encode()
        if "body_b64" in data:
            data["body"] = base64.b64decode(data.pop("body_b64"))
        return cls(**data)


@attrs.define
class PendingShape:
    """How GET /pending answers (CONTRACT.md §1 says: a JSON array; these are what else may come).

    mode `list`: the array (as bytes), optionally cut after `truncate_at` bytes (then the
    connection drops) or dripped `drip_bytes` at a time every `drip_interval` seconds;
    mode `wrap`: `{"data": [...]}`; mode `raw`: exactly `raw` (e.g. b"{}", b"null", HTML).
    """

    mode: str = "list"
    raw: bytes = b""
    status: int = 200
    content_type: str = "application/json"
    truncate_at: int | None = None
    drip_bytes: int = 0
    drip_interval: float = 0.0
    count: int | None = None  # answers left in this shape (None: until calm)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PendingShape:
        data = dict(data)
        if isinstance(data.get("raw"), str):
            data["raw"] = data["raw"].encode()
        if "raw_b64" in data:
            data["raw"] = base64.b64decode(data.pop("raw_b64"))
        return cls(**data)


@attrs.define
class TokenAnswer:
    """Override the token endpoint's 200 answer: `fields` maps a field to its raw JSON bytes
    (b"NaN", b"-1", b'"3600"', b'"t\u00f6k"'), `drop` removes fields, `raw` replaces the
    whole body (`status` with it). An `access_token` override is a valid token for the API."""

    fields: dict[str, bytes] = attrs.field(factory=dict)
    drop: tuple[str, ...] = ()
    raw: bytes | None = None
    status: int = 200
    content_type: str = "application/json"
    count: int | None = None  # answers left (None: until calm)
    probability: float = 1.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenAnswer:
        data = dict(data)
        data["fields"] = {k: (v.encode() if isinstance(v, str) else orjson.dumps(v)) for k, v in data.get("fields", {}).items()}
        data["drop"] = tuple(data.get("drop", ()))
        if isinstance(data.get("raw"), str):
            data["raw"] = data["raw"].encode()
        return cls(**data)


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
    faults: dict[str, Fault | list[Fault]] = attrs.field(factory=dict)
    token_requests: int = 0
    first_token_at: float | None = None
    last_patch_at: float | None = None
    rng: random.Random = attrs.field(factory=lambda: random.Random(1234))
    keep_patch_bodies: bool = False
    raw: dict[str, bytes] = attrs.field(factory=dict)  # key -> the entry's bytes in the pending list
    pending_shape: PendingShape | None = None
    token_answer: TokenAnswer | None = None
    issued: list[str] = attrs.field(factory=list)  # every access token handed out (secrets to look for)
    reasons: dict[str, str] = attrs.field(factory=dict)  # task id -> last `reason`/`error` of a failed PATCH
    results: dict[str, list[bytes]] = attrs.field(factory=dict)  # task id -> sha1 of each succeeded result, in order
    # The platform's callback (sandbox/chain.py): None accepts, a reason refuses with 400.
    on_result: Callable[[SandboxState, dict[str, Any], Any], str | None] | None = None
    keep_results: bool = True  # False (long runs): keep only digests, and what `result_check` says
    result_check: Callable[[str, Any], bool] | None = None  # (task id, result) -> is it the right one?
    wrong_results: list[str] = attrs.field(factory=list)  # ids whose succeeded result failed `result_check`
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

    def insert_raw_bytes(self, raw: bytes, key: str | None = None, *, task_type: str = "text_embedding") -> str:
        """Put `raw` (any bytes: one JSON value, valid or not) verbatim into the pending list.

        With `key` (the entry's id as the API would see it), PATCH /api/ai-tasks/<key> finds
        it; the entry then leaves the pending list like any task. Returns the key."""
        key = key if key is not None else f"raw-{next(self._counter)}"
        now = iso(self.clock())
        self.tasks[key] = {"_id": key, "type": task_type, "state": "pending", "createdAt": now, "updatedAt": now, "__v": 0}
        self.raw[key] = raw
        self.pending[key] = None
        return key

    def calm(self) -> None:
        """Switch every fault and hostile shape off (the world calms down)."""
        self.faults.clear()
        self.pending_shape = None
        self.token_answer = None

    def claim_times(self) -> list[float]:
        """When each claim (PATCH in_progress) was applied, on the sandbox clock."""
        return sorted(p.at for p in self.patches if p.state == "in_progress")

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
            "faults_fired": {route: sum(f.fired for f in (fs if isinstance(fs, list) else [fs])) for route, fs in self.faults.items()},
        }

    def task_report(self) -> list[dict[str, Any]]:
        """Per task: id, state, claims, succeeded reports (sha1 of each result), last failure reason."""
        claims: Counter[str] = Counter(p.task_id for p in self.patches if p.state == "in_progress")
        return [
            {"_id": key, "state": t.get("state"), "claims": claims.get(key, 0), "results": [h.decode() for h in self.results.get(key, [])],
             "reason": self.reasons.get(key), "raw": key in self.raw}
            for key, t in self.tasks.items() if isinstance(t, dict)
        ]

    # -- auth --------------------------------------------------------------------------
    def issue_token(self) -> dict[str, Any]:
        token = "sbx_tok_" + secrets.token_urlsafe(24)
        self.tokens[token] = self.clock() + self.token_lifetime
        self.issued.append(token)
        return {"access_token": token, "token_type": "bearer", "expires_in": int(self.token_lifetime), "scope": "read write"}

    def _take_token_answer(self) -> TokenAnswer | None:
        ans = self.token_answer
        if ans is None or (ans.count is not None and ans.count <= 0) or self.rng.random() >= ans.probability:
            return None
        if ans.count is not None:
            ans.count -= 1
        return ans

    def hostile_token(self, ans: TokenAnswer) -> tuple[int, bytes, str]:
        """The token answer as bytes, shaped by `ans` (the token it names is valid for the API)."""
        if ans.raw is not None:
            return ans.status, ans.raw, ans.content_type
        body = self.issue_token()
        if "access_token" in ans.fields:
            self.tokens.pop(body["access_token"], None)
            try:
                value = orjson.loads(ans.fields["access_token"])
            except orjson.JSONDecodeError:
                value = None
            if isinstance(value, str):
                self.tokens[value] = self.clock() + self.token_lifetime
                self.issued.append(value)
        out: dict[str, Any] = {k: v for k, v in body.items() if k not in ans.drop}
        out.update({k: orjson.Fragment(v) for k, v in ans.fields.items() if k not in ans.drop})
        return ans.status, orjson.dumps(out), ans.content_type

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
        carried_out = fault is None or fault.apply or not fault.status
        if fault is not None and fault.latency and carried_out and not (fault.drop or fault.hang):
            # a slow request the API carries out: it is applied even if the client gives up
            # meanwhile (hypercorn cancels the app when the client leaves; the real API does not)
            with trio.CancelScope(shield=True):
                await trio.sleep(fault.latency)
                dispatched = await self._dispatch(scope, method, path, body)
            await self._answer(send, route, fault, dispatched)
            return
        if fault is not None and fault.latency:
            await trio.sleep(fault.latency)
        if fault is not None and fault.hang:
            self._count(route, 0)
            await trio.sleep(fault.hang)
            await _break(send)
        if fault is not None and fault.drop:
            self._count(route, 0)
            if fault.apply:
                await self._dispatch(scope, method, path, body)
            await _break(send)
        if fault is not None and not fault.apply and fault.status:
            await self._send_fault(send, route, fault)
            return
        await self._answer(send, route, fault, await self._dispatch(scope, method, path, body))

    async def _answer(self, send: Send, route: str, fault: Fault | None, dispatched: tuple[int, Any, Iterator[bytes] | None]) -> None:
        status, payload, stream = dispatched
        if fault is not None and fault.apply and fault.status:
            await self._send_fault(send, route, fault)
            return
        if isinstance(payload, RawAnswer):
            self._count(route, status)
            await _send_bytes(send, status, payload.body, payload.content_type)
            return
        if stream is not None:
            await self._send_stream(send, route, status, stream, self._take_shape() if route == "pending" else None)
            return
        await self._send_json(send, route, status, payload)

    def _count(self, route: str, status: int) -> None:
        self.state.requests[(route, status)] += 1
        self.state.request_log.append((self.state.clock(), route, status))

    async def _send_fault(self, send: Send, route: str, fault: Fault) -> None:
        if fault.body is not None:
            self._count(route, fault.status)
            await _send_bytes(send, fault.status, fault.body, fault.content_type)
        else:
            await self._send_json(send, route, fault.status, {"statusCode": fault.status, "message": "injected fault"})

    def _take_shape(self) -> PendingShape | None:
        shape = self.state.pending_shape
        if shape is None or (shape.count is not None and shape.count <= 0):
            return None
        if shape.count is not None:
            shape.count -= 1
        return shape

    async def _send_stream(self, send: Send, route: str, status: int, stream: Iterator[bytes], shape: PendingShape | None) -> None:
        if shape is not None and shape.mode == "raw":
            self._count(route, shape.status)
            await _send_bytes(send, shape.status, shape.raw, shape.content_type)
            return
        if shape is not None and shape.mode == "wrap":
            stream = itertools.chain([b'{"data":'], stream, [b"}"])
        if shape is not None and shape.status != 200:
            status = shape.status
        self._count(route, status)
        ctype = shape.content_type.encode() if shape is not None else b"application/json"
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
        sent = 0
        cut = shape.truncate_at if shape is not None else None
        drip = shape.drip_bytes if shape is not None else 0
        for chunk in stream:
            if cut is not None and sent + len(chunk) >= cut:
                await send({"type": "http.response.body", "body": chunk[: cut - sent], "more_body": True})
                raise ConnectionAbortedError("sandbox: pending body truncated")
            sent += len(chunk)
            if drip and shape is not None:
                for i in range(0, len(chunk), drip):
                    await send({"type": "http.response.body", "body": chunk[i : i + drip], "more_body": True})
                    await trio.sleep(shape.drip_interval)
            else:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await trio.lowlevel.checkpoint()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _take_fault(self, route: str, body: bytes) -> Fault | None:
        if route == "admin":
            return None
        candidates: list[str] = [route]
        if route == "patch":
            try:
                state = orjson.loads(body).get("state")
            except (orjson.JSONDecodeError, AttributeError):
                state = None
            sub = PATCH_ROUTES.get(state) if isinstance(state, str) else None
            candidates = ([sub] if sub else []) + ["patch"]
        else:
            state = None
        for name in [*candidates, "*"]:
            entry = self.state.faults.get(name)
            if entry is None:
                continue
            for fault in entry if isinstance(entry, list) else [entry]:
                if fault.only_state is not None and state != fault.only_state:
                    continue
                if fault.count is not None and fault.count <= 0:
                    continue
                if self.state.rng.random() >= fault.probability:
                    continue
                if fault.count is not None:
                    fault.count -= 1
                fault.fired += 1
                return fault
        return None

    async def _send_json(self, send: Send, route: str, status: int, payload: Any) -> None:
        self._count(route, status)
        await _send_bytes(send, status, orjson.dumps(payload), "application/json")

    async def _dispatch(self, scope: Scope, method: str, path: str, body: bytes) -> tuple[int, Any, Iterator[bytes] | None]:
        st = self.state
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path == "/oauth2/token" and method == "POST":
            return (*self._token(headers, body), None)
        if path.startswith("/_sandbox/"):
            return (*self._admin(method, path, body, scope), None)
        if not path.startswith(TASKS_PREFIX):
            return 404, {"statusCode": 404, "message": f"Cannot {method} {path}"}, None
        auth = headers.get("authorization", "")
        if not auth.lower().startswith("bearer ") or not st.token_valid(_header_text(scope, auth[7:].strip())):
            return 401, {"statusCode": 401, "message": "Unauthorized"}, None
        rest = path[len(TASKS_PREFIX):]
        query = parse_qs(scope.get("query_string", b"").decode())
        if rest == "/pending" and method == "GET":
            return 200, None, _stream_array([st.raw.get(i) or st.tasks[i] for i in st.pending])
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
            raw_path = scope.get("raw_path")
            task_id = unquote(raw_path.decode("latin-1").split("?", 1)[0][len(TASKS_PREFIX) + 1 :]) if raw_path else rest[1:]
            return (*self._patch(task_id, body), None)
        return 404, {"statusCode": 404, "message": f"Cannot {method} {path}"}, None

    def _token(self, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        st = self.state
        st.token_requests += 1
        if st.first_token_at is None:
            st.first_token_at = time.time()
        if "application/x-www-form-urlencoded" not in headers.get("content-type", ""):
            return 400, {"error": "invalid_request", "error_description": "expected a form body"}
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
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
        answer = st._take_token_answer()
        if answer is not None:
            status, raw, ctype = st.hostile_token(answer)
            return status, RawAnswer(raw, ctype)
        return 200, st.issue_token()

    def _patch(self, task_id: str, body: bytes) -> tuple[int, Any]:
        st = self.state
        if not OBJECT_ID_RE.fullmatch(task_id):
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
        if has_result and (st.keep_results or state != "succeeded"):
            task["result"] = data["result"]
        if has_result and state == "succeeded" and st.result_check is not None and not st.result_check(task_id, data["result"]):
            st.wrong_results.append(task_id)
        task["updatedAt"] = iso(now)
        task["__v"] = task.get("__v", 0) + 1 if isinstance(task.get("__v", 0), int) else 1
        if state == "pending":
            st.pending[task_id] = None
        else:
            st.pending.pop(task_id, None)
        st.patch_counts[task_id] += 1
        st.last_patch_at = time.time()
        st.patches.append(PatchRecord(task_id, state, now, data if st.keep_patch_bodies else {k: v for k, v in data.items() if k != "result"}))
        if state == "failed":
            reason = data.get("reason", data.get("error"))
            st.reasons[task_id] = reason if isinstance(reason, str) else ""
        if state == "succeeded" and has_result:
            digest = hashlib.sha1(result_bytes).hexdigest()
            st.callbacks[task_id] += 1
            st.callback_results.setdefault(task_id, set()).add(digest)
            st.results.setdefault(task_id, []).append(digest.encode())
            refused = st.on_result(st, task, data["result"]) if st.on_result is not None else None
            if refused is not None:  # the state is saved already, as on the real API
                return 400, {"statusCode": 400, "message": f"callback refused the result: {refused}"}
        return 200, task

    def _admin(self, method: str, path: str, body: bytes, scope: Scope) -> tuple[int, Any]:
        st = self.state
        try:
            data = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            return 400, {"statusCode": 400, "message": "invalid JSON"}
        if path == "/_sandbox/stats":
            return 200, st.stats()
        if path == "/_sandbox/seed" and method == "POST":
            ids = st.seed(int(data.get("count", 10)), text_size=int(data.get("text_size", 60)), model=data.get("model"),
                          prefix=str(data.get("prefix", "claim")))
            extra = st.seed_malformed() if data.get("malformed") else {}
            return 200, {"ids": ids if data.get("return_ids") else len(ids), "malformed": extra}
        if path == "/_sandbox/faults" and method == "POST":
            route = data.pop("route", "*")
            if data.get("clear"):
                st.faults.pop(route, None) if route != "*" else st.faults.clear()
            elif "faults" in data:
                st.faults[route] = [Fault.from_json(f) for f in data["faults"]]
            else:
                st.faults[route] = Fault.from_json(data)
            return 200, {"faults": list(st.faults)}
        if path == "/_sandbox/raw" and method == "POST":
            raw = base64.b64decode(data["raw_b64"]) if "raw_b64" in data else str(data["raw"]).encode()
            return 200, {"key": st.insert_raw_bytes(raw, data.get("key"), task_type=data.get("type", "text_embedding"))}
        if path == "/_sandbox/pending-shape" and method == "POST":
            st.pending_shape = None if data.get("clear") else PendingShape.from_json(data)
            return 200, {"pending_shape": st.pending_shape is not None}
        if path == "/_sandbox/token-answer" and method == "POST":
            st.token_answer = None if data.get("clear") else TokenAnswer.from_json(data)
            return 200, {"token_answer": st.token_answer is not None}
        if path == "/_sandbox/calm" and method == "POST":
            st.calm()
            return 200, {"calm": True}
        if path == "/_sandbox/revoke" and method == "POST":
            st.revoke_all()
            return 200, {"revoked": True}
        if path == "/_sandbox/clients" and method == "POST":
            st.client_secret = data.get("client_secret", st.client_secret)
            return 200, {"client_id": st.client_id}
        if path == "/_sandbox/claims":
            return 200, [[p.task_id, p.state, p.at] for p in st.patches]
        if path == "/_sandbox/tasks":
            return 200, st.task_report()
        if path == "/_sandbox/secrets":
            return 200, {"client_secret": st.client_secret, "tokens": st.issued}
        return 404, {"statusCode": 404, "message": "unknown sandbox route"}


async def _break(send: Send) -> None:
    """Break the connection mid-answer: the client gets a status line and then a transfer
    error (hypercorn answers 500 for an app that fails before it started a response, so a
    clean reset cannot be had from inside ASGI; to a client both are a broken exchange)."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4096")]})
    await send({"type": "http.response.body", "body": b"{", "more_body": True})
    raise ConnectionAbortedError("sandbox fault: connection dropped")


@attrs.frozen
class RawAnswer:
    body: bytes
    content_type: str = "application/json"


def _header_text(scope: Scope, value: str) -> str:
    """Header values arrive as bytes; a non-ASCII token is compared as the UTF-8 it was sent as."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


async def _send_bytes(send: Send, status: int, data: bytes, content_type: str) -> None:
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(data)).encode())],
    })
    await send({"type": "http.response.body", "body": data})


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


def _dump(item: Any) -> bytes:
    return item if isinstance(item, bytes) else orjson.dumps(item)


def _stream_array(items: list[Any]) -> Iterator[bytes]:
    """Serialise a JSON array in chunks, as the body of a streamed response. Items that are
    bytes go out verbatim (raw entries); dicts may hold `orjson.Fragment` values."""
    if not items:
        yield b"[]"
        return
    for i in range(0, len(items), STREAM_CHUNK_TASKS):
        part = items[i : i + STREAM_CHUNK_TASKS]
        data = b",".join(_dump(x) for x in part)
        yield (b"[" if i == 0 else b",") + data
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
