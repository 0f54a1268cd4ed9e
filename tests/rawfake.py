"""A wrapper around the sandbox that serves exact raw bytes where JSON libraries would not.

The sandbox serialises with orjson, which cannot write integers beyond 64 bits, lone
surrogate escapes or bytes that are not UTF-8. Real peers can (JavaScript writes such
numbers; a manual edit can leave `"\\udc00"`). `RawWorld` serves the sandbox's pending list
with chosen entries replaced by raw bytes, or a whole raw body, and can answer the token
endpoint with raw bytes; every other request goes to the sandbox unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import trio

from processor.sandbox import SandboxApp, SandboxState, serve_asgi
from tests.conftest import Sandbox

PENDING = "/api/ai-tasks/pending"


@attrs.define
class RawWorld:
    app: SandboxApp
    entries: dict[str, bytes] = attrs.field(factory=dict)  # task id -> raw bytes for its entry
    head: list[bytes] = attrs.field(factory=list)  # raw entries served before the sandbox's
    body: bytes | None = None  # serve exactly this as the pending list (status 200)
    content_type: bytes = b"application/json"
    token: Callable[[dict[str, Any]], tuple[int, bytes] | None] | None = None  # raw token answers
    pending_served: int = 0

    @property
    def state(self) -> SandboxState:
        return self.app.state

    def pending_body(self) -> bytes:
        if self.body is not None:
            return self.body
        st = self.state
        parts = list(self.head)
        parts += [self.entries.get(i) or orjson.dumps(st.tasks[i]) for i in st.pending]
        return b"[" + b",".join(parts) + b"]"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == PENDING:
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
            auth = headers.get("authorization", "")
            if not (auth.lower().startswith("bearer ") and self.state.token_valid(auth[7:].strip())):
                await _answer(send, 401, b'{"statusCode":401,"message":"Unauthorized"}', b"application/json")
                return
            self.pending_served += 1
            await _answer(send, 200, self.pending_body(), self.content_type)
            return
        if scope["type"] == "http" and scope["path"] == "/oauth2/token" and self.token is not None:
            answer = self.token(self.state.issue_token())
            if answer is not None:
                self.state.token_requests += 1
                await _answer(send, answer[0], answer[1], b"application/json")
                return
        await self.app(scope, receive, send)


async def _answer(send: Any, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def raw_world() -> AsyncIterator[tuple[RawWorld, Sandbox]]:
    world = RawWorld(SandboxApp(SandboxState()))
    stop = trio.Event()
    async with trio.open_nursery() as n:
        url = await n.start(lambda task_status: serve_asgi(world, "127.0.0.1", 0, shutdown=stop, task_status=task_status))
        try:
            yield world, Sandbox(world.state, url)
        finally:
            stop.set()
