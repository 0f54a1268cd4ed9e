"""Ollama chat with the answer's JSON schema as `format` (CONTRACT.md §7), over httpx.

`POST /api/chat` with `stream: false`, `format: <schema>`, `options.temperature: 0` and
`keep_alive`. A chat model is made ready on first use, whether or not it is listed in
SUPPORTED_MODELS (that list is for embeddings): `/api/show`, pulled when missing (one pull
per model at a time, bounded by the download timeout), and checked for the `completion`
capability. A model that cannot be made ready is `Fault.MODEL_MISSING` (the task waits,
pending, for a deployment that serves it); it is tried again after `RECHECK_SECONDS`.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import trio

from processor.effects.backends.ollama import keep_alive_wire
from processor.effects.chat.base import ChatAnswer, ChatError, ChatRequest, checked_json, estimate_tokens
from processor.effects.chat.metrics import ChatMetrics
from processor.effects.logs import get_logger
from processor.pure.faults import Fault

RECHECK_SECONDS = 300.0  # a model found missing is looked at again after this long


class OllamaChat:
    name = "ollama"

    def __init__(
        self, *, base_url: str, timeout: float, download_timeout: float, keep_alive: str, num_ctx: int,
        max_tokens: int, metrics: ChatMetrics,
    ) -> None:
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=httpx.Timeout(timeout, connect=10))
        self._timeout = timeout
        self._download_timeout = download_timeout
        self._keep_alive = keep_alive_wire(keep_alive)  # `-1` as a number: Ollama refuses the string
        self._num_ctx = num_ctx
        self._max_tokens = max_tokens
        self._metrics = self.metrics = metrics
        self._ready: set[str] = set()
        self._missing: dict[str, tuple[float, str]] = {}  # model -> (trio time, reason)
        self._locks: dict[str, trio.Lock] = {}
        self._log = get_logger("ollama_chat")

    @property
    def unavailable(self) -> dict[str, str]:
        """Models this server cannot serve, with the reason (for /health)."""
        return {m: why for m, (_, why) in self._missing.items()}

    def body(self, request: ChatRequest) -> dict[str, Any]:
        options: dict[str, Any] = {"temperature": 0}
        if self._num_ctx:
            options["num_ctx"] = self._num_ctx
        if self._max_tokens:
            options["num_predict"] = self._max_tokens
        return {
            "model": request.model,
            "messages": [{"role": "system", "content": request.system}, {"role": "user", "content": request.user}],
            "stream": False,
            "format": request.schema,
            "options": options,
            "keep_alive": self._keep_alive,
        }

    async def complete(self, request: ChatRequest) -> ChatAnswer:
        await self.ensure(request.model)
        resp = await self._post_chat(request)
        if resp.status_code == 404:
            # removed since we looked: make it ready again, once, then ask again
            self._ready.discard(request.model)
            await self.ensure(request.model)
            resp = await self._post_chat(request)
        if resp.status_code != 200:
            self._count(request, str(resp.status_code))
            raise _classify(request.model, resp)
        return self._answer(request, resp)

    async def _post_chat(self, request: ChatRequest) -> httpx.Response:
        started = trio.current_time()
        try:
            return await self._http.post("/api/chat", content=orjson.dumps(self.body(request)),
                                         headers={"Content-Type": "application/json"}, timeout=self._timeout)
        except httpx.TimeoutException:
            self._count(request, "timeout")
            raise ChatError(f"Ollama chat with {request.model} timed out", Fault.TIMEOUT) from None
        except httpx.HTTPError as exc:
            self._count(request, "connection_error")
            raise ChatError(f"Ollama unreachable: {type(exc).__name__}", Fault.UNREACHABLE) from None
        finally:
            self._metrics.duration.labels(self.name).observe(trio.current_time() - started)

    def _answer(self, request: ChatRequest, resp: httpx.Response) -> ChatAnswer:
        try:
            data = orjson.loads(resp.content)
            content = data["message"]["content"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._count(request, "malformed")
            raise ChatError("Ollama returned a chat answer without a message", Fault.MALFORMED) from None
        prompt = data.get("prompt_eval_count")
        completion = data.get("eval_count")
        prompt = prompt if isinstance(prompt, int) else estimate_tokens(request.system + request.user)
        completion = completion if isinstance(completion, int) else estimate_tokens(str(content))
        self._metrics.tokens.labels(self.name, request.model, request.task_type, "prompt").inc(prompt)
        self._metrics.tokens.labels(self.name, request.model, request.task_type, "completion").inc(completion)
        finish = str(data.get("done_reason") or "stop")
        if finish == "length":
            self._count(request, "length")
            raise ChatError("the answer was cut off (done_reason length)", Fault.BAD_ANSWER)
        try:
            text = checked_json(content, who="Ollama")
        except ChatError:
            self._count(request, "invalid_json")
            raise
        self._count(request, "success")
        return ChatAnswer(text, finish, prompt, completion, str(data.get("model") or request.model))

    def _count(self, request: ChatRequest, outcome: str) -> None:
        self._metrics.requests.labels(self.name, request.model, request.task_type, outcome).inc()

    # -- models: ready on first use -------------------------------------------------------
    async def ensure(self, model: str) -> None:
        """Make `model` ready (show, pull if missing, completion capability) or raise
        MODEL_MISSING. Transport failures are UNREACHABLE/TIMEOUT, never MODEL_MISSING."""
        if model in self._ready:
            return
        missing = self._missing.get(model)
        if missing is not None and trio.current_time() - missing[0] < RECHECK_SECONDS:
            raise ChatError(f"model {model!r} is not available on Ollama: {missing[1]}", Fault.MODEL_MISSING, status=404)
        lock = self._locks.setdefault(model, trio.Lock())
        async with lock:
            if model in self._ready:
                return
            try:
                await self._make_ready(model)
            except ChatError as exc:
                if exc.fault is Fault.MODEL_MISSING:
                    self._missing[model] = (trio.current_time(), str(exc))
                    self._log.error("ollama_chat_model_unavailable", model=model, error=str(exc))
                raise
            self._missing.pop(model, None)
            self._ready.add(model)

    async def _make_ready(self, model: str) -> None:
        info = await self._show(model)
        if info is None:
            await self._pull(model)
            info = await self._show(model)
            if info is None:
                raise ChatError(f"model {model!r} is still unknown to Ollama after a pull", Fault.MODEL_MISSING, status=404)
        caps = info.get("capabilities")
        if isinstance(caps, list) and "completion" not in caps:
            raise ChatError(f"{model} cannot chat (capabilities: {', '.join(map(str, caps))})", Fault.MODEL_MISSING)
        self._log.info("ollama_chat_model_ready", model=model)

    async def _show(self, model: str) -> dict[str, Any] | None:
        try:
            resp = await self._http.post("/api/show", json={"model": model})
        except httpx.TimeoutException:
            raise ChatError("Ollama /api/show timed out", Fault.TIMEOUT) from None
        except httpx.HTTPError as exc:
            raise ChatError(f"Ollama unreachable: {type(exc).__name__}", Fault.UNREACHABLE) from None
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise _classify(model, resp)
        try:
            info = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            raise ChatError("Ollama /api/show answered something that is not JSON", Fault.MALFORMED) from None
        return info if isinstance(info, dict) else {}

    async def _pull(self, model: str) -> None:
        self._log.info("ollama_chat_pull_started", model=model)
        with trio.move_on_after(self._download_timeout) as scope:
            try:
                async with self._http.stream("POST", "/api/pull", json={"model": model, "stream": True}, timeout=None) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        self._metrics.ollama_pulls.labels("failed").inc()
                        raise ChatError(f"pulling {model} answered {resp.status_code}: {_error_text(resp)}", Fault.MODEL_MISSING,
                                        status=resp.status_code)
                    async for line in resp.aiter_lines():
                        event = _event(line)
                        if "error" in event:
                            self._metrics.ollama_pulls.labels("failed").inc()
                            raise ChatError(f"pulling {model} failed: {str(event['error'])[:200]}", Fault.MODEL_MISSING)
                        if event.get("status") == "success":
                            self._metrics.ollama_pulls.labels("success").inc()
                            self._log.info("ollama_chat_pull_done", model=model)
                            return
            except httpx.HTTPError as exc:
                raise ChatError(f"pulling {model} was interrupted ({type(exc).__name__})", Fault.UNREACHABLE) from None
            raise ChatError(f"pulling {model}: the stream ended without success", Fault.MALFORMED)
        if scope.cancelled_caught:
            self._metrics.ollama_pulls.labels("timeout").inc()
            raise ChatError(f"pulling {model} did not finish within {self._download_timeout:g}s", Fault.TIMEOUT)

    async def check(self, model: str) -> str:
        await self.ensure(model)
        return f"{model} is ready and can chat"

    async def aclose(self) -> None:
        await self._http.aclose()


def _event(line: str) -> dict[str, Any]:
    if not line.strip():
        return {}
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return {}
    return event if isinstance(event, dict) else {}


def _classify(model: str, resp: httpx.Response) -> ChatError:
    status = resp.status_code
    message = f"Ollama {status}: {_error_text(resp)}"[:500]
    if status == 404:
        return ChatError(f"model {model!r} not found on Ollama: {message}", Fault.MODEL_MISSING, status=status)
    if status == 429:
        return ChatError(message, Fault.RATE_LIMITED, status=status, retry_after=_retry_after(resp))
    if status == 503:
        return ChatError(message, Fault.BUSY, status=status, retry_after=_retry_after(resp))
    if status == 408:
        return ChatError(message, Fault.TIMEOUT, status=status)
    if status >= 500:
        return ChatError(message, Fault.SERVER, status=status)
    if status in (401, 403):
        return ChatError(message, Fault.AUTH, status=status)
    # a 400 from Ollama is about the request (format, options, the model), not the claim
    return ChatError(message, Fault.PARAMETER, status=status)


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        value = resp.headers.get("retry-after")
        return float(value) if value is not None else None
    except ValueError:
        return None


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])[:300]
    except ValueError:
        pass
    return resp.text[:300]
