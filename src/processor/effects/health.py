"""The operator's endpoints: GET /health (liveness), /ready (readiness), /metrics.

They need no authentication and are often published, while some of what they show comes
from peers (error texts of the token endpoint, the task API, the backends), which may echo
a secret. So every string in a /health or /ready answer passes the log redactor and is cut
to `MAX_TEXT` characters, and a list to `MAX_ITEMS` entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, make_asgi_app

from processor.effects.asgi import lifespan
from processor.effects.logs import REDACTOR, Redactor
from processor.pure.jsonstream import printable

MAX_TEXT = 300
MAX_ITEMS = 50


def safe(value: Any, redactor: Redactor = REDACTOR, depth: int = 0) -> Any:
    """`value` with every string redacted and bounded (keys too); nesting and lists bounded."""
    if isinstance(value, str):
        text = redactor.redact(printable(value, 4 * MAX_TEXT))
        return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth > 8:
        return "…"
    if isinstance(value, dict):
        return {safe(str(k), redactor, depth + 1): safe(v, redactor, depth + 1) for k, v in list(value.items())[:MAX_ITEMS]}
    if isinstance(value, (list, tuple)):
        return [safe(v, redactor, depth + 1) for v in list(value)[:MAX_ITEMS]]
    return safe(str(value), redactor, depth + 1)


class HealthApp:
    def __init__(
        self,
        registry: CollectorRegistry,
        health: Callable[[], dict[str, Any]],
        ready: Callable[[], list[str]],
    ) -> None:
        self._metrics = make_asgi_app(registry)
        self._health = health
        self._ready = ready

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/metrics":
            await self._metrics(scope, receive, send)
            return
        if path == "/health":
            await _json(send, 200, safe(self._health()))
        elif path == "/ready":
            reasons = self._ready()
            await _json(send, 503 if reasons else 200, {"ready": not reasons, "reasons": safe(reasons)})
        else:
            await _json(send, 404, {"error": "not found", "routes": ["/health", "/ready", "/metrics"]})


async def _json(send: Any, status: int, payload: Any) -> None:
    body = orjson.dumps(payload, default=str)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
