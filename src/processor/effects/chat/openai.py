"""OpenAI chat completions with a strict JSON schema (CONTRACT.md §7), over httpx.

`POST {base}/v1/chat/completions` with `response_format: json_schema, strict: true`.
Reasoning models (o1, o3, o3-mini, o4-mini, gpt-5*) get no `temperature` and
`max_completion_tokens`; other models get `temperature: 0` and `max_tokens`. A 400 naming
the parameter is `Fault.PARAMETER`; the adapter also remembers it for that model, so the
next request leaves the parameter out (a new model family needs no release).

Failures are classified like the embedding adapter's: 401/403 AUTH, 429 QUOTA (code
`insufficient_quota`) or RATE_LIMITED (`retry_after`), 404 MODEL_MISSING, 408/timeout
TIMEOUT, 503 BUSY, other 5xx SERVER, no answer UNREACHABLE, a 2xx without choices
MALFORMED; a refusal, `finish_reason: length` or `content_filter`, or content that is not
a JSON object BAD_ANSWER. No other exception leaves `complete`.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import trio

from processor.effects.chat.base import ChatAnswer, ChatError, ChatRequest, checked_json
from processor.effects.chat.metrics import ChatMetrics
from processor.effects.logs import REDACTOR, get_logger
from processor.effects.openai_pacing import ModelPacer, TokenPacer
from processor.pure.faults import Fault
from processor.pure.triage import is_reasoning_model

DEFAULT_BASE = "https://api.openai.com"


def chat_url(base_url: str | None) -> str:
    base = (base_url or DEFAULT_BASE).rstrip("/")
    return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"


class OpenAIChat:
    name = "openai"

    def __init__(
        self, *, api_key: str, base_url: str | None, timeout: float, max_tokens: int, metrics: ChatMetrics,
        http: httpx.AsyncClient | None = None, pacer: TokenPacer | None = None,
    ) -> None:
        REDACTOR.add(api_key)
        self._url = chat_url(base_url)
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10), limits=httpx.Limits(max_connections=32))
        self._own_http = http is None
        self._timeout = timeout
        self._max_tokens = max_tokens
        self._metrics = self.metrics = metrics
        self.pacer = pacer or TokenPacer()  # x-ratelimit-* pacing per model (effects/openai_pacing.py)
        self._dropped: dict[str, set[str]] = {}  # model -> parameters a 400 refused
        self._log = get_logger("openai_chat")

    def body(self, request: ChatRequest) -> dict[str, Any]:
        """The request body for `request`, under the model's parameter rules."""
        model = request.model
        dropped = self._dropped.get(model, set())
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "system", "content": request.system}, {"role": "user", "content": request.user}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": request.schema_name, "schema": request.schema, "strict": True},
            },
        }
        reasoning = is_reasoning_model(model) or "max_tokens" in dropped
        if not is_reasoning_model(model) and "temperature" not in dropped:
            body["temperature"] = 0
        if self._max_tokens:
            key = "max_completion_tokens" if reasoning else "max_tokens"
            if key not in dropped:
                body[key] = self._max_tokens
        return body

    async def complete(self, request: ChatRequest) -> ChatAnswer:
        pace = self.pacer.model(request.model)
        chars = len(request.system) + len(request.user)
        await pace.wait_turn(pace.estimate(chars, items=2, chat=True))  # prompt + expected completion
        try:
            return await self._complete(request, pace, chars)
        finally:
            pace.forget()  # no answer came: the reservation goes

    async def _complete(self, request: ChatRequest, pace: ModelPacer, chars: int) -> ChatAnswer:
        started = trio.current_time()
        try:
            resp = await self._http.post(self._url, content=orjson.dumps(self.body(request)), headers=self._headers,
                                         timeout=self._timeout)
        except httpx.TimeoutException:
            self._count(request, "timeout")
            raise ChatError("OpenAI chat request timed out", Fault.TIMEOUT) from None
        except httpx.HTTPError as exc:
            self._count(request, "connection_error")
            raise ChatError(f"OpenAI unreachable: {type(exc).__name__}", Fault.UNREACHABLE) from None
        finally:
            self._metrics.duration.labels(self.name).observe(trio.current_time() - started)
        if resp.status_code != 200:
            self._count(request, str(resp.status_code))
            error = self._classify(request.model, resp)
            limited = error.fault is Fault.RATE_LIMITED
            pace.after(resp.headers, 0 if limited else None, chars=chars, retry_after=error.retry_after if limited else None)
            raise error
        try:
            answer = self._answer(request, resp)
        except ChatError:
            pace.after(resp.headers, chars=chars)
            raise
        pace.after(resp.headers, answer.prompt_tokens or None, completion=answer.completion_tokens, chars=chars)
        return answer

    def _answer(self, request: ChatRequest, resp: httpx.Response) -> ChatAnswer:
        try:
            data = orjson.loads(resp.content)
            choice = data["choices"][0]
            message = choice["message"]
            finish = str(choice.get("finish_reason") or "")
            usage = data.get("usage") or {}
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            self._count(request, "malformed")
            raise ChatError("OpenAI returned a chat answer without choices", Fault.MALFORMED) from None
        prompt = _int(usage.get("prompt_tokens") if isinstance(usage, dict) else None)
        completion = _int(usage.get("completion_tokens") if isinstance(usage, dict) else None)
        self._tokens(request, prompt, completion)
        if not isinstance(message, dict):
            self._count(request, "malformed")
            raise ChatError("OpenAI returned a choice without a message", Fault.MALFORMED)
        if message.get("refusal"):
            self._count(request, "refusal")
            raise ChatError(f"the model refused: {str(message['refusal'])[:200]}", Fault.BAD_ANSWER)
        if finish in ("length", "content_filter"):
            self._count(request, finish)
            raise ChatError(f"the answer was cut off (finish_reason {finish})", Fault.BAD_ANSWER)
        try:
            content = checked_json(message.get("content"), who="OpenAI")
        except ChatError:
            self._count(request, "invalid_json")
            raise
        self._count(request, "success")
        return ChatAnswer(content, finish or "stop", prompt, completion, str(data.get("model") or request.model))

    def _count(self, request: ChatRequest, outcome: str) -> None:
        self._metrics.requests.labels(self.name, request.model, request.task_type, outcome).inc()

    def _tokens(self, request: ChatRequest, prompt: int, completion: int) -> None:
        if prompt:
            self._metrics.tokens.labels(self.name, request.model, request.task_type, "prompt").inc(prompt)
        if completion:
            self._metrics.tokens.labels(self.name, request.model, request.task_type, "completion").inc(completion)

    def _classify(self, model: str, resp: httpx.Response) -> ChatError:
        status = resp.status_code
        try:
            body = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            body = {}
        err = body.get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else {}
        code, param = err.get("code"), err.get("param")
        message = f"OpenAI {status}: {err.get('message') or resp.text[:200]}"[:500]
        if status == 429:
            if code == "insufficient_quota":
                return ChatError(message, Fault.QUOTA, status=status)
            retry_after = _float(resp.headers.get("retry-after"))
            return ChatError(message, Fault.RATE_LIMITED, status=status, retry_after=retry_after)
        if status in (401, 403):
            return ChatError(message, Fault.AUTH, status=status)
        if status == 404:
            return ChatError(message, Fault.MODEL_MISSING, status=status)
        if status == 408:
            return ChatError(message, Fault.TIMEOUT, status=status)
        if status == 503:
            return ChatError(message, Fault.BUSY, status=status, retry_after=_float(resp.headers.get("retry-after")))
        if status >= 500:
            return ChatError(message, Fault.SERVER, status=status)
        if status == 400 and isinstance(param, str) and param:
            if param in ("temperature", "max_tokens", "max_completion_tokens"):
                self._dropped.setdefault(model, set()).add(param)
                self._log.warning("openai_chat_parameter_dropped", model=model, param=param)
            return ChatError(message, Fault.PARAMETER, status=status, param=param)
        return ChatError(message, Fault.INPUT, status=status)

    async def check(self, model: str) -> str:
        request = ChatRequest(
            model, "Answer with a JSON object.", 'Reply {"ok": true}.',
            {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
            "check", "check",
        )
        answer = await self.complete(request)
        return f"{model} answered ({answer.prompt_tokens}+{answer.completion_tokens} tokens)"

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()


def _int(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
