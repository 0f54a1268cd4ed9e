"""Local stand-ins for OpenAI's and Ollama's embedding endpoints, with a latency model
(`base` seconds per request + `per_input` per input) and counters of every input seen.

For tests and benchmarks that need a backend in another process's reach (replicas), and
to measure requests per task. Deterministic vectors; Ollama answers one request at a
time per model, as the real server does.

The hostile world (issue 11), switchable in-process (`FakeBackendState` fields) or over
HTTP (`POST /_fake/world` with the same names as JSON, `POST /_fake/calm`, `GET /_fake/stats`):

* `answers`: a list of `Answer(kind, probability, count, status, body)` tried in order on
  each embedding request; the first that fires shapes the reply. Kinds: `status` (that
  status with `body`, e.g. 503, or `400 matryoshka_dim=1024 is not in a valid range`),
  `html` (a 200 text/html page), `null` (`{"embeddings": null}` / `{"data": null}`),
  `no_data` (JSON without `embeddings` / `data`), `wrong_count` (one vector short),
  `wrong_dims` (vectors one element short), `nan` (a bare `NaN` in a vector),
  `wrong_types` (strings instead of numbers), `truncated` (half a body, then the
  connection drops), `reset` (drop without an answer), `hang` (wait `latency`, then drop).
* `poison`: substrings; a batch holding one answers `poison_status` (500 by default), as
  Ollama does for an input that breaks the model: the whole batch fails.
* `native_dim` with `dimensions_mode`: the model's real size; a request asking for other
  `dimensions` is answered with a 400 naming the parameter (`reject`) or with vectors of
  `native_dim` anyway (`ignore`), as OpenAI-compatible servers do.
* `busy`: the share of embedding calls answered 503 (a busy Ollama queue).
* `slow_per_char`: a slow CPU server: requests are computed one at a time, FIFO, each for
  `slow_per_char * characters` seconds, and a request whose client gave up (timeout,
  disconnect) is still computed before the next one starts.

Every embedding request is recorded (`received`: path, model, inputs, `keep_alive`,
`dimensions`, `truncate`, time), and every input (`input_log`: time, text).

    python -m processor.sandbox.fake_backends --port 11434 [--slow] [--busy 0.2] [--dim 768]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import attrs
import orjson
import trio

from processor.effects.asgi import lifespan

ANSWER_KINDS = ("status", "html", "null", "no_data", "wrong_count", "wrong_dims", "nan", "wrong_types", "truncated", "reset", "hang")
SLOW_PER_CHAR = 1 / 2000  # 1 s per 2,000-character text


def _vector(model: str, text: str, dim: int) -> list[float]:
    raw = hashlib.shake_256(f"{model}\x00{text}".encode()).digest(dim)
    v = [(b - 127.5) / 127.5 for b in raw]
    norm = sum(x * x for x in v) ** 0.5 or 1.0
    return [x / norm for x in v]


def expected_vector(model: str, text: str, dim: int, *, openai: bool) -> list[float]:
    """The vector the daemon should report for `text` (OpenAI's travel as float32)."""
    v = _vector(model, text, dim)
    if openai:
        return list(struct.unpack(f"<{dim}f", struct.pack(f"<{dim}f", *v)))
    return v


@attrs.define
class Answer:
    kind: str = "status"
    probability: float = 1.0
    count: int | None = None  # answers left (None: until calm)
    status: int = 503
    body: bytes | None = None  # for `status`: the raw body (default: an error JSON of the right shape)
    latency: float = 0.0  # for `hang`: how long before the connection drops
    fired: int = attrs.field(default=0, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Answer:
        data = dict(data)
        if isinstance(data.get("body"), str):
            data["body"] = data["body"].encode()
        if data.get("kind", "status") not in ANSWER_KINDS:
            raise ValueError(f"unknown answer kind {data.get('kind')!r}")
        return cls(**data)


def param_error(dim: int, native: int) -> bytes:
    """What an OpenAI-compatible server says for `dimensions` above the model's size."""
    return orjson.dumps({"error": {"message": f"matryoshka_dim={dim} is not in a valid range (the model has {native})",
                                   "type": "invalid_request_error", "param": "dimensions", "code": None}})


@attrs.define
class FakeBackendState:
    base: float = 0.02
    per_input: float = 0.001
    dim: int = 1024
    inputs: Counter[str] = attrs.field(factory=Counter)
    requests: int = 0
    serial: bool = False  # Ollama: one request at a time
    models: list[str] = attrs.field(factory=lambda: ["nomic-embed-text:latest"])  # what /api/tags lists
    known_models: list[str] | None = None  # when set, any other model answers 404 (model not found)
    # -- the hostile world ---------------------------------------------------------------
    answers: list[Answer] = attrs.field(factory=list)
    poison: list[str] = attrs.field(factory=list)
    poison_status: int = 500
    native_dim: int | None = None
    dimensions_mode: str = "reject"  # or "ignore"
    busy: float = 0.0
    slow_per_char: float = 0.0
    rng_seed: int = 4321
    clock: Callable[[], float] = time.time
    # -- what was seen -------------------------------------------------------------------
    received: deque[dict[str, Any]] = attrs.field(factory=lambda: deque(maxlen=50_000))
    input_log: deque[tuple[float, str]] = attrs.field(factory=lambda: deque(maxlen=500_000))
    served: Counter[str] = attrs.field(factory=Counter)  # inputs answered with a good vector
    statuses: Counter[str] = attrs.field(factory=Counter)
    busy_until: float = 0.0  # slow mode: trio time the server's queue is computed until
    computed_abandoned: int = 0  # slow mode: requests computed after their client left
    _lock: trio.Lock = attrs.field(factory=trio.Lock)
    _rng: Any = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        import random

        self._rng = random.Random(self.rng_seed)

    def calm(self) -> None:
        self.answers.clear()
        self.poison.clear()
        self.busy = 0.0

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "inputs": sum(self.inputs.values()), "distinct_inputs": len(self.inputs),
                "served": sum(self.served.values()), "statuses": dict(self.statuses), "computed_abandoned": self.computed_abandoned,
                "keep_alive": dict(Counter(repr(r.get("keep_alive")) for r in self.received)),
                "dimensions": dict(Counter(repr(r.get("dimensions")) for r in self.received))}

    def configure(self, data: dict[str, Any]) -> None:
        """Set world fields from JSON (the HTTP control endpoint)."""
        for key, value in data.items():
            if key == "answers":
                self.answers = [Answer.from_json(a) for a in value]
            elif key in ("poison", "poison_status", "native_dim", "dimensions_mode", "busy", "slow_per_char", "base",
                         "per_input", "dim", "serial", "models", "known_models"):
                setattr(self, key, value)
            else:
                raise ValueError(f"unknown world field {key!r}")

    def take_answer(self) -> Answer | None:
        for a in self.answers:
            if a.count is not None and a.count <= 0:
                continue
            if self._rng.random() >= a.probability:
                continue
            if a.count is not None:
                a.count -= 1
            a.fired += 1
            return a
        return None

    def draw(self) -> float:
        return float(self._rng.random())


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
        st = self.state
        if path.startswith("/_fake/"):
            await self._admin(send, path, body)
            return
        if path == "/api/tags":
            await _reply(send, 200, {"models": [{"name": m, "model": m} for m in st.models]})
            return
        if path == "/api/show":
            await _reply(send, 200, {"capabilities": ["embedding"], "model_info": {"x.embedding_length": st.native_dim or st.dim}})
            return
        if path not in ("/v1/embeddings", "/api/embed"):
            await _reply(send, 404, {"error": "not found"})
            return
        ollama = path == "/api/embed"
        try:
            req = orjson.loads(body)
            texts = req["input"] if isinstance(req["input"], list) else [req["input"]]
            model = req["model"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            await self._status(send, ollama, 400, None, "invalid request body")
            return
        st.received.append({"path": path, "model": model, "inputs": len(texts), "keep_alive": req.get("keep_alive", "<absent>"),
                            "dimensions": req.get("dimensions"), "truncate": req.get("truncate"), "at": st.clock(),
                            "chars": sum(len(t) for t in texts if isinstance(t, str))})
        now = st.clock()
        for t in texts:
            st.input_log.append((now, t))
        st.inputs.update(t for t in texts if isinstance(t, str))
        await self._compute(texts)
        st.requests += 1
        if st.known_models is not None and model not in st.known_models:
            await self._status(send, ollama, 404, None, f'model "{model}" not found, try pulling it first')
            return
        # -- hostile answers, in order of precedence -----------------------------------
        if isinstance(req.get("keep_alive"), str) and not _valid_duration(req["keep_alive"]):
            await self._status(send, ollama, 400, None, f'time: invalid duration "{req["keep_alive"]}"')
            return
        if st.busy and st.draw() < st.busy:
            await self._status(send, ollama, 503, None, "server busy, please try again. maximum pending requests exceeded")
            return
        if st.poison and any(p in t for t in texts if isinstance(t, str) for p in st.poison):
            await self._status(send, ollama, st.poison_status, None, "failed to encode response: an input broke the model")
            return
        answer = st.take_answer()
        dim = st.dim
        want = req.get("dimensions")
        if not ollama and isinstance(want, int):
            if st.native_dim is not None and want != st.native_dim:
                if st.dimensions_mode == "reject":
                    st.statuses["400"] += 1
                    await _reply_bytes(send, 400, param_error(want, st.native_dim))
                    return
                dim = st.native_dim
            else:
                dim = want
        elif st.native_dim is not None:
            dim = st.native_dim
        if answer is not None and await self._hostile(send, answer, ollama, model, texts, dim):
            return
        st.statuses["200"] += 1
        st.served.update(texts)
        if ollama:
            await _reply(send, 200, {"model": model, "embeddings": [_vector(model, t, dim) for t in texts], "prompt_eval_count": len(texts)})
            return
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(struct.pack(f"<{dim}f", *_vector(model, t, dim))).decode()}
                for i, t in enumerate(texts)]
        await _reply(send, 200, {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)}})

    async def _compute(self, texts: list[Any]) -> None:
        st = self.state
        if st.slow_per_char:
            # one request at a time, FIFO; the cost is booked when the request arrives, so a
            # request whose client leaves is still computed before the next one starts
            cost = st.base + st.slow_per_char * sum(len(t) for t in texts if isinstance(t, str))
            now = trio.current_time()
            done_at = max(now, st.busy_until) + cost
            st.busy_until = done_at
            try:
                await trio.sleep_until(done_at)
            except trio.Cancelled:
                st.computed_abandoned += 1
                raise
            return
        delay = st.base + st.per_input * len(texts)
        if st.serial:
            async with st._lock:
                await trio.sleep(delay)
        else:
            await trio.sleep(delay)

    async def _status(self, send: Any, ollama: bool, status: int, body: bytes | None, message: str) -> None:
        self.state.statuses[str(status)] += 1
        if body is None:
            body = orjson.dumps({"error": message} if ollama else {"error": {"message": message, "type": "server_error", "param": None, "code": None}})
        await _reply_bytes(send, status, body)

    async def _hostile(self, send: Any, a: Answer, ollama: bool, model: str, texts: list[Any], dim: int) -> bool:
        """Answer per `a`; False when the kind leaves the answer as it is."""
        st = self.state
        st.statuses[a.kind] += 1
        vec = lambda t, d=dim: _vector(model, str(t), d)  # noqa: E731
        if a.kind == "status":
            await self._status(send, ollama, a.status, a.body, f"injected {a.status}")
        elif a.kind == "html":
            await _reply_bytes(send, 200, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
        elif a.kind == "null":
            await _reply_bytes(send, 200, b'{"model":"m","embeddings":null}' if ollama else b'{"object":"list","data":null}')
        elif a.kind == "no_data":
            await _reply(send, 200, {"model": model} if ollama else {"object": "list", "model": model, "usage": {"prompt_tokens": 1}})
        elif a.kind == "wrong_count":
            vs = [vec(t) for t in texts[:-1]] if len(texts) > 1 else [vec(texts[0]), vec(texts[0])]
            await self._vectors(send, ollama, model, vs)
        elif a.kind == "wrong_dims":
            await self._vectors(send, ollama, model, [vec(t, max(1, dim - 1)) for t in texts])
        elif a.kind == "nan":
            # a bare NaN (what Python's json.dumps writes for float("nan")) as the first element
            raw = [orjson.dumps(vec(t)) for t in texts]
            raw[0] = b"[NaN," + raw[0].split(b",", 1)[1]
            if ollama:
                await _reply_bytes(send, 200, b'{"model":"m","embeddings":[' + b",".join(raw) + b"]}")
            else:
                items = b",".join(b'{"object":"embedding","index":%d,"embedding":%s}' % (i, v) for i, v in enumerate(raw))
                await _reply_bytes(send, 200, b'{"object":"list","model":"m","data":[' + items + b"]}")
        elif a.kind == "wrong_types":
            await self._vectors(send, ollama, model, [[str(x) for x in vec(t)[:8]] for t in texts], raw_strings=True)
        elif a.kind == "truncated":
            data = orjson.dumps({"model": model, "embeddings": [vec(t) for t in texts]})
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data[: len(data) // 2], "more_body": True})
            raise ConnectionAbortedError("fake backend: body truncated")
        elif a.kind == "reset":
            await _break(send)
        elif a.kind == "hang":
            await trio.sleep(a.latency or 3600)
            await _break(send)
        else:  # pragma: no cover - from_json validates
            return False
        return True

    async def _vectors(self, send: Any, ollama: bool, model: str, vs: list[Any], raw_strings: bool = False) -> None:
        if ollama:
            await _reply(send, 200, {"model": model, "embeddings": vs})
        else:
            await _reply(send, 200, {"object": "list", "model": model,
                                     "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vs)]})

    async def _admin(self, send: Any, path: str, body: bytes) -> None:
        st = self.state
        try:
            data = orjson.loads(body) if body else {}
            if path == "/_fake/world":
                st.configure(data)
            elif path == "/_fake/calm":
                st.calm()
            elif path != "/_fake/stats":
                await _reply(send, 404, {"error": "unknown fake route"})
                return
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            await _reply(send, 400, {"error": str(exc)})
            return
        await _reply(send, 200, st.stats())


async def _break(send: Any) -> None:
    """A connection that breaks before the answer's body (hypercorn turns an app that fails
    before starting a response into a 500, so the break comes after the status line)."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4096")]})
    await send({"type": "http.response.body", "body": b"{", "more_body": True})
    raise ConnectionAbortedError("fake backend: connection dropped")


def _valid_duration(value: str) -> bool:
    """Go's time.ParseDuration, as Ollama reads `keep_alive` strings: "5m", "1h30m", "-1s".

    A bare number as a string ("-1") is not a duration; Ollama wants the number itself."""
    import re

    return re.fullmatch(r"-?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+|0", value) is not None


async def _reply(send: Any, status: int, payload: Any) -> None:
    await _reply_bytes(send, status, orjson.dumps(payload))


async def _reply_bytes(send: Any, status: int, data: bytes, content_type: str = "application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def main(argv: list[str] | None = None) -> int:
    from processor.effects.asgi import serve_asgi

    ap = argparse.ArgumentParser(prog="python -m processor.sandbox.fake_backends",
                                 description="A fake OpenAI + Ollama embedding server (one port serves both APIs).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=11434)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--models", default="nomic-embed-text:latest", help="comma-separated names /api/tags lists")
    ap.add_argument("--slow", action="store_true", help="a slow CPU server: 1 s per 2,000 characters, one request at a time")
    ap.add_argument("--busy", type=float, default=0.0, help="share of embedding calls answered 503")
    ap.add_argument("--serial", action="store_true", help="one request at a time (Ollama)")
    args = ap.parse_args(argv)
    state = FakeBackendState(dim=args.dim, models=args.models.split(","), busy=args.busy, serial=args.serial,
                             slow_per_char=SLOW_PER_CHAR if args.slow else 0.0, base=0.0 if args.slow else 0.02)

    async def serve() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as n:
            url = await n.start(lambda task_status: serve_asgi(FakeEmbeddings(state), args.host, args.port, shutdown=stop, task_status=task_status))
            print(f"fake embedding server listening on {url}", flush=True)
            with trio.open_signal_receiver(2, 15) as signals:
                async for _ in signals:
                    stop.set()
                    break

    trio.run(serve)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
