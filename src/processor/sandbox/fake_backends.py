"""Local stand-ins for OpenAI's and Ollama's embedding endpoints, with a latency model
(`base` seconds per request + `per_input` per input) and counters of every input seen.

For tests and benchmarks that need a backend in another process's reach (replicas), and
to measure requests per task. Deterministic vectors; Ollama answers one request at a
time per model, as the real server does.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections import Counter
from typing import Any

import attrs
import orjson
import trio

from processor.effects.asgi import lifespan


def _vector(model: str, text: str, dim: int) -> list[float]:
    raw = hashlib.shake_256(f"{model}\x00{text}".encode()).digest(dim)
    v = [(b - 127.5) / 127.5 for b in raw]
    norm = sum(x * x for x in v) ** 0.5 or 1.0
    return [x / norm for x in v]


@attrs.define
class FakeBackendState:
    base: float = 0.02
    per_input: float = 0.001
    dim: int = 1024
    inputs: Counter[str] = attrs.field(factory=Counter)
    requests: int = 0
    serial: bool = False  # Ollama: one request at a time
    _lock: trio.Lock = attrs.field(factory=trio.Lock)


class FakeEmbeddings:
    """ASGI app: POST /v1/embeddings (OpenAI) and POST /api/embed (Ollama)."""

    def __init__(self, state: FakeBackendState | None = None) -> None:
        self.state = state or FakeBackendState()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        path = scope["path"]
        if path == "/api/tags":
            await _reply(send, 200, {"models": [{"name": "nomic-embed-text:latest"}]})
            return
        if path == "/api/show":
            await _reply(send, 200, {"capabilities": ["embedding"], "model_info": {"x.embedding_length": self.state.dim}})
            return
        if path not in ("/v1/embeddings", "/api/embed"):
            await _reply(send, 404, {"error": "not found"})
            return
        req = orjson.loads(body)
        texts = req["input"] if isinstance(req["input"], list) else [req["input"]]
        st = self.state
        if st.serial:
            async with st._lock:
                await trio.sleep(st.base + st.per_input * len(texts))
        else:
            await trio.sleep(st.base + st.per_input * len(texts))
        st.requests += 1
        st.inputs.update(texts)
        model = req["model"]
        if path == "/api/embed":
            await _reply(send, 200, {"model": model, "embeddings": [_vector(model, t, st.dim) for t in texts], "prompt_eval_count": len(texts)})
            return
        dim = int(req.get("dimensions") or st.dim)
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(struct.pack(f"<{dim}f", *_vector(model, t, dim))).decode()}
                for i, t in enumerate(texts)]
        await _reply(send, 200, {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)}})


async def _reply(send: Any, status: int, payload: Any) -> None:
    data = orjson.dumps(payload)
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": data})
