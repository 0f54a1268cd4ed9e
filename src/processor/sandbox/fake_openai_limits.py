"""A fake OpenAI that enforces a real per-minute limit (CONTRACT.md §3, §7).

A sliding minute of tokens and requests, as the account's limits: a request that would
take either past its limit is answered 429 (`retry-after`: whole seconds until enough of
the minute has expired, `retry-after-ms` the same in ms; an OpenAI-shaped error body,
code `rate_limit_exceeded`) and charged nothing. Every answer, 429s included, carries
`x-ratelimit-limit-*`, `x-ratelimit-remaining-*` and `x-ratelimit-reset-*` (the time until
the minute is empty again, OpenAI's "resets to its initial state"), for requests and
tokens. Tokens are counted with its own rule (a token per 3.3 characters, at least one
per input), not the client's, and reported as `usage`; chat answers charge the prompt
plus the completion. Counters for the benchmarks: every accepted charge with its time,
429s, first and last request.

    python -m processor.sandbox.fake_openai_limits --tpm 100000 --rpm 5000
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import math
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import orjson
import trio

from processor.effects.asgi import lifespan

CHARS_PER_TOKEN = 3.3


def count_tokens(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def fmt_reset(seconds: float) -> str:
    """OpenAI's duration format: `1m0s`, `6.5s`, `120ms`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.3f}s" if minutes else f"{rest:.3f}s"


@attrs.define
class LimitState:
    tpm: int = 100_000
    rpm: int = 5_000
    window: float = 60.0
    base: float = 0.02  # seconds per request
    per_input: float = 0.0002
    dim: int = 1024
    completion_tokens: int = 40  # what a chat answer costs
    clock: Callable[[], float] = time.monotonic
    log: deque[tuple[float, int]] = attrs.field(factory=deque)  # accepted (time, tokens) within the window
    charges: list[tuple[float, int]] = attrs.field(factory=list)  # every accepted charge (wall time, tokens)
    requests: int = 0
    rejected: int = 0
    rejections: list[tuple[float, int]] = attrs.field(factory=list)  # (wall time, tokens asked)
    tokens: int = 0
    first_at: float | None = None
    last_ok_at: float | None = None

    def _prune(self, now: float) -> None:
        while self.log and self.log[0][0] <= now - self.window:
            self.log.popleft()

    def used(self, now: float) -> tuple[int, int]:
        self._prune(now)
        return sum(t for _, t in self.log), len(self.log)

    def headers(self, now: float) -> list[tuple[bytes, bytes]]:
        tokens, reqs = self.used(now)
        reset = (self.log[-1][0] + self.window - now) if self.log else 0.0
        return [
            (b"x-ratelimit-limit-requests", str(self.rpm).encode()),
            (b"x-ratelimit-limit-tokens", str(self.tpm).encode()),
            (b"x-ratelimit-remaining-requests", str(max(0, self.rpm - reqs)).encode()),
            (b"x-ratelimit-remaining-tokens", str(max(0, self.tpm - tokens)).encode()),
            (b"x-ratelimit-reset-requests", fmt_reset(reset).encode()),
            (b"x-ratelimit-reset-tokens", fmt_reset(reset).encode()),
        ]

    def wait_for(self, now: float, need: int) -> float:
        """Seconds until `need` tokens and one request fit in the sliding minute."""
        tokens, reqs = self.used(now)
        free_t, free_r = self.tpm - tokens, self.rpm - reqs
        if need > self.tpm:
            return self.window
        if free_t >= need and free_r >= 1:
            return 0.0
        for at, t in self.log:
            free_t, free_r = free_t + t, free_r + 1
            if free_t >= need and free_r >= 1:
                return max(0.0, at + self.window - now)
        return self.window

    def charge(self, need: int) -> tuple[bool, float, list[tuple[bytes, bytes]]]:
        """Charge `need` tokens and a request now, or refuse: (accepted, retry_after, headers)."""
        now = self.clock()
        self.requests += 1
        if self.first_at is None:
            self.first_at = time.time()
        tokens, reqs = self.used(now)
        if tokens + need > self.tpm or reqs + 1 > self.rpm:
            self.rejected += 1
            self.rejections.append((time.time(), need))
            return False, self.wait_for(now, need), self.headers(now)
        self.log.append((now, need))
        self.charges.append((time.time(), need))
        self.tokens += need
        self.last_ok_at = time.time()
        return True, 0.0, self.headers(now)

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "rejected": self.rejected, "tokens": self.tokens, "tpm": self.tpm,
                "rpm": self.rpm, "window": self.window, "first_at": self.first_at, "last_ok_at": self.last_ok_at,
                "charges": self.charges, "rejections": self.rejections}


def _vector(model: str, text: str, dim: int) -> str:
    raw = hashlib.shake_256(f"{model}\x00{text}".encode()).digest(dim)
    v = [(b - 127.5) / 127.5 for b in raw]
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return base64.b64encode(struct.pack(f"<{dim}f", *(x / norm for x in v))).decode()


class FakeOpenAILimits:
    """ASGI app: POST /v1/embeddings, POST /v1/chat/completions, GET /_fake/stats."""

    def __init__(self, state: LimitState | None = None) -> None:
        self.state = state or LimitState()

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
        path, st = scope["path"].removeprefix("/v1"), self.state
        if path.startswith("/_fake/stats"):
            await _reply(send, 200, st.stats())
            return
        if path not in ("/embeddings", "/chat/completions"):
            await _reply(send, 404, {"error": {"message": "not found", "type": "invalid_request_error", "code": None}})
            return
        try:
            req = orjson.loads(body)
            model = str(req["model"])
            if path == "/embeddings":
                texts = req["input"] if isinstance(req["input"], list) else [req["input"]]
                prompt = sum(count_tokens(str(t)) for t in texts)
                completion = 0
            else:
                texts = [str(m.get("content", "")) for m in req["messages"]]
                prompt = sum(count_tokens(t) + 4 for t in texts)
                completion = st.completion_tokens
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            await _reply(send, 400, {"error": {"message": "bad request", "type": "invalid_request_error", "code": None}})
            return
        accepted, wait, headers = st.charge(prompt + completion)
        if not accepted:
            limit, used = st.tpm, st.used(st.clock())[0]
            message = (f"Rate limit reached for {model} in organization org-fake on tokens per min (TPM): "
                       f"Limit {limit}, Used {used}, Requested {prompt + completion}. Please try again in {wait:.3f}s.")
            retry = [(b"retry-after", str(math.ceil(wait)).encode()), (b"retry-after-ms", str(math.ceil(wait * 1000)).encode())]
            await _reply(send, 429, {"error": {"message": message, "type": "tokens", "param": None, "code": "rate_limit_exceeded"}},
                         headers + retry)
            return
        await trio.sleep(st.base + st.per_input * len(texts))
        headers = st.headers(st.clock())  # the figures as they stand when the answer leaves
        if path == "/embeddings":
            dim = int(req.get("dimensions") or st.dim)
            data = [{"object": "embedding", "index": i, "embedding": _vector(model, str(t), dim)} for i, t in enumerate(texts)]
            await _reply(send, 200, {"object": "list", "data": data, "model": model,
                                     "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}, headers)
            return
        content = orjson.dumps({"ok": True}).decode()
        await _reply(send, 200, {
            "id": "chatcmpl-fake", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }, headers)


async def _reply(send: Any, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = orjson.dumps(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


def main(argv: list[str] | None = None) -> int:
    from processor.effects.asgi import serve_asgi

    ap = argparse.ArgumentParser(prog="python -m processor.sandbox.fake_openai_limits",
                                 description="A fake OpenAI (embeddings, chat) with a sliding-minute token and request limit.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tpm", type=int, default=100_000)
    ap.add_argument("--rpm", type=int, default=5_000)
    ap.add_argument("--dim", type=int, default=1024)
    args = ap.parse_args(argv)
    state = LimitState(tpm=args.tpm, rpm=args.rpm, dim=args.dim)

    async def serve() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as n:
            url = await n.start(lambda task_status: serve_asgi(FakeOpenAILimits(state), args.host, args.port, shutdown=stop, task_status=task_status))
            print(f"fake OpenAI with limits listening on {url}", flush=True)
            with trio.open_signal_receiver(2, 15) as signals:
                async for _ in signals:
                    stop.set()
                    break

    trio.run(serve)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
