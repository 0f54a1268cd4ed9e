"""The operator's endpoints: GET /health (liveness), /ready (readiness), /metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, make_asgi_app

from processor.effects.asgi import lifespan


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
            await _json(send, 200, self._health())
        elif path == "/ready":
            reasons = self._ready()
            await _json(send, 503 if reasons else 200, {"ready": not reasons, "reasons": reasons})
        else:
            await _json(send, 404, {"error": "not found", "routes": ["/health", "/ready", "/metrics"]})


async def _json(send: Any, status: int, payload: Any) -> None:
    body = orjson.dumps(payload, default=str)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
