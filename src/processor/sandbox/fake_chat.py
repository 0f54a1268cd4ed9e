"""Local stand-ins for OpenAI's and Ollama's chat endpoints (CONTRACT.md §7).

One ASGI app answers `POST /v1/chat/completions` (OpenAI) and `POST /api/chat` (Ollama),
plus Ollama's `/api/tags`, `/api/show` and `/api/pull`. Answers follow the request's JSON
schema (values derived from the claim text) and, on request, go wrong the ways real models
do: invalid JSON, a value outside the enum, a refusal, a cut-off answer, an empty list.
The fake is as strict as the real servers where it matters: a reasoning model given
`temperature` or `max_tokens` answers 400 naming the parameter; a strict schema with a
property missing from `required` or without `additionalProperties: false` is a 400; an
Ollama model that is not pulled is a 404 until pulled.

Test hooks (`/_fake/config`, `/_fake/stats`) change the behaviour and read counters from
another process.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import attrs
import orjson
import trio

from processor.effects.asgi import lifespan
from processor.effects.chat.mock import claim_text, mock_answer
from processor.pure.triage import is_reasoning_model

BAD_KINDS = ("invalid_json", "out_of_enum", "refusal", "cutoff", "empty_list", "wrong_type")


@attrs.define
class FakeChatState:
    latency: float = 0.0  # seconds per answer
    bad_rate: float = 0.0  # share of answers that are bad (kinds drawn from `bad_kinds`)
    bad_kinds: tuple[str, ...] = BAD_KINDS
    script: list[str] = attrs.field(factory=list)  # forced outcomes for the next answers ("good", a bad kind, "429", "503", "500")
    pulled: set[str] = attrs.field(factory=lambda: {"qwen3:4b", "nomic-embed-text", "nomic-embed-text:latest"})
    pullable: set[str] | None = None  # None: any model can be pulled
    embedding_only: set[str] = attrs.field(factory=lambda: {"nomic-embed-text", "nomic-embed-text:latest"})
    api_key: str | None = None  # when set, OpenAI requests need it
    seed: int = 7
    requests: Counter[str] = attrs.field(factory=Counter)  # by route
    answers: Counter[str] = attrs.field(factory=Counter)  # by outcome ("good" or a bad kind)
    by_task_type: Counter[str] = attrs.field(factory=Counter)  # schema name -> answers
    bodies: list[dict[str, Any]] = attrs.field(factory=list)  # last requests (bounded)
    in_flight: int = 0
    max_in_flight: int = 0
    rng: random.Random = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.rng is None:
            self.rng = random.Random(self.seed)

    def next_outcome(self) -> str:
        if self.script:
            return self.script.pop(0)
        if self.bad_rate and self.rng.random() < self.bad_rate:
            return self.rng.choice(self.bad_kinds)
        return "good"

    def stats(self) -> dict[str, Any]:
        return {"requests": dict(self.requests), "answers": dict(self.answers), "by_task_type": dict(self.by_task_type),
                "max_in_flight": self.max_in_flight, "pulled": sorted(self.pulled)}


_LABELS = {("personalities",): "identifying_data", ("topics",): "defining_topics",
           ("description", "name"): "defining_impact_area", ("severity",): "defining_severity"}


def schema_label(schema: Any) -> str:
    """Which triage type an answer schema belongs to (Ollama requests carry no schema name)."""
    props = tuple(sorted(schema.get("properties", {}))) if isinstance(schema, dict) else ()
    return _LABELS.get(props, "+".join(props) or "?")


def strict_problem(schema: Any, path: str = "$") -> str | None:
    """Why OpenAI's strict mode would refuse `schema` (None: it would accept it)."""
    if not isinstance(schema, dict):
        return f"{path}: schema must be an object"
    if schema.get("type") == "object":
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is not False:
            return f"{path}: additionalProperties must be false"
        if sorted(schema.get("required", [])) != sorted(props):
            return f"{path}: every property must be listed in required"
        for name, sub in props.items():
            problem = strict_problem(sub, f"{path}.{name}")
            if problem:
                return problem
    if schema.get("type") == "array":
        return strict_problem(schema.get("items", {}), f"{path}[]")
    return None


def bad_content(kind: str, schema: dict[str, Any], good: Any) -> str:
    """The content of a bad answer of `kind` for `schema` (good: the answer it spoils)."""
    if kind == "invalid_json":
        return orjson.dumps(good).decode()[:-3] + "..."
    if kind == "wrong_type":
        return orjson.dumps({k: 42 for k in good}).decode()
    if kind == "empty_list":
        return orjson.dumps({k: ([] if isinstance(v, list) else "") for k, v in good.items()}).decode()
    # out_of_enum (and the refusal/cutoff fallbacks): an enum value the schema does not offer
    spoiled = {k: ("not-a-level" if "enum" in schema["properties"][k] else v) for k, v in good.items()}
    if spoiled == good:  # no enum in this schema: a list of people/topics with invented fields
        spoiled = {k: ([{"nome": "x"}] if isinstance(v, list) else v) for k, v in good.items()}
    return orjson.dumps(spoiled).decode()


class FakeChat:
    """ASGI app for both chat APIs."""

    def __init__(self, state: FakeChatState | None = None) -> None:
        self.state = state or FakeChatState()

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
        st.requests[path] += 1
        try:
            req = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            await _reply(send, 400, {"error": {"message": "invalid JSON body", "type": "invalid_request_error"}})
            return
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path == "/_fake/config":
            for key, value in req.items():
                setattr(st, key, set(value) if key in ("pulled", "pullable") and value is not None else
                        tuple(value) if key == "bad_kinds" else value)
            await _reply(send, 200, st.stats())
        elif path == "/_fake/stats":
            await _reply(send, 200, st.stats())
        elif path == "/v1/chat/completions":
            await self._openai(send, req, headers)
        elif path == "/api/chat":
            await self._ollama(send, req)
        elif path == "/api/tags":
            await _reply(send, 200, {"models": [{"name": m, "model": m} for m in sorted(st.pulled)]})
        elif path == "/api/show":
            await self._show(send, req)
        elif path == "/api/pull":
            await self._pull(send, req)
        else:
            await _reply(send, 404, {"error": "not found"})

    async def _answer_after_latency(self) -> str:
        st = self.state
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            if st.latency:
                await trio.sleep(st.latency)
        finally:
            st.in_flight -= 1
        return st.next_outcome()

    async def _openai(self, send: Any, req: dict[str, Any], headers: dict[str, str]) -> None:
        st = self.state
        if st.api_key is not None and headers.get("authorization") != f"Bearer {st.api_key}":
            await _reply(send, 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}})
            return
        model = str(req.get("model", ""))
        for param in ("temperature", "max_tokens"):
            if is_reasoning_model(model) and param in req and not (param == "temperature" and req[param] == 1):
                await _reply(send, 400, {"error": {"message": f"Unsupported parameter: '{param}' is not supported with this model.",
                                                   "type": "invalid_request_error", "param": param, "code": "unsupported_parameter"}})
                return
        fmt = req.get("response_format") or {}
        js = fmt.get("json_schema") or {}
        schema = js.get("schema")
        if fmt.get("type") != "json_schema" or not isinstance(schema, dict):
            await _reply(send, 400, {"error": {"message": "response_format json_schema expected here", "type": "invalid_request_error",
                                               "param": "response_format", "code": None}})
            return
        problem = strict_problem(schema) if js.get("strict") else None
        if problem:
            await _reply(send, 400, {"error": {"message": f"Invalid schema for response_format '{js.get('name')}': {problem}",
                                               "type": "invalid_request_error", "param": "response_format", "code": None}})
            return
        self._keep(req)
        outcome = await self._answer_after_latency()
        if outcome in ("429", "503", "500"):
            status = int(outcome)
            st.answers[outcome] += 1
            await _reply(send, status, {"error": {"message": f"injected {status}", "type": "server_error" if status >= 500 else "requests",
                                                  "code": "rate_limit_exceeded" if status == 429 else None}},
                         extra=[(b"retry-after", b"1")] if status == 429 else [])
            return
        st.answers[outcome] += 1
        st.by_task_type[str(js.get("name"))] += 1
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        finish = "stop"
        good = mock_answer(schema, claim_text(_user(req)))
        if outcome == "good":
            message["content"] = orjson.dumps(good).decode()
        elif outcome == "refusal":
            message["refusal"] = "I'm sorry, I can't help with that."
        elif outcome == "cutoff":
            message["content"], finish = orjson.dumps(good).decode()[:10], "length"
        else:
            message["content"] = bad_content(outcome, schema, good)
        prompt = sum(len(str(m.get("content", ""))) for m in req.get("messages", [])) // 4 + 1
        await _reply(send, 200, {
            "id": "chatcmpl-fake", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": 20, "total_tokens": prompt + 20},
        }, extra=[(b"x-ratelimit-limit-requests", b"10000"), (b"x-ratelimit-remaining-requests", b"9999"),
                  (b"x-ratelimit-reset-requests", b"6ms")])

    async def _ollama(self, send: Any, req: dict[str, Any]) -> None:
        st = self.state
        model = str(req.get("model", ""))
        if model not in st.pulled:
            await _reply(send, 404, {"error": f'model "{model}" not found, try pulling it first'})
            return
        schema = req.get("format")
        if req.get("stream") is not False or not isinstance(schema, dict):
            await _reply(send, 400, {"error": "this fake expects stream: false and a JSON schema as format"})
            return
        self._keep(req)
        outcome = await self._answer_after_latency()
        if outcome in ("429", "503", "500"):
            st.answers[outcome] += 1
            await _reply(send, int(outcome), {"error": "server busy, please try again. maximum pending requests exceeded"
                                              if outcome == "503" else f"injected {outcome}"})
            return
        st.answers[outcome] += 1
        st.by_task_type[schema_label(schema)] += 1
        good = mock_answer(schema, claim_text(_user(req)))
        done_reason = "stop"
        if outcome == "good":
            content = orjson.dumps(good).decode()
        elif outcome == "refusal":  # a local model "refuses" in prose, not JSON
            content = "Desculpe, não posso ajudar com isso."
        elif outcome == "cutoff":
            content, done_reason = orjson.dumps(good).decode()[:10], "length"
        else:
            content = bad_content(outcome, schema, good)
        answer: dict[str, Any] = {"model": model, "created_at": "2025-01-01T00:00:00Z",
                                 "message": {"role": "assistant", "content": content}, "done": True, "done_reason": done_reason,
                                 "prompt_eval_count": 100, "eval_count": 20}
        await _reply(send, 200, answer)

    async def _show(self, send: Any, req: dict[str, Any]) -> None:
        model = str(req.get("model") or req.get("name") or "")
        if model not in self.state.pulled:
            await _reply(send, 404, {"error": f"model '{model}' not found"})
            return
        caps = ["embedding"] if model in self.state.embedding_only else ["completion", "tools"]
        await _reply(send, 200, {"capabilities": caps, "model_info": {"general.architecture": "fake"}})

    async def _pull(self, send: Any, req: dict[str, Any]) -> None:
        st = self.state
        model = str(req.get("model") or req.get("name") or "")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x-ndjson")]})
        if st.pullable is not None and model not in st.pullable:
            lines: list[dict[str, Any]] = [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
        else:
            lines = [{"status": "pulling manifest"}, {"status": "pulling abc", "digest": "sha256:abc", "total": 100, "completed": 100},
                     {"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
            st.pulled.add(model)
        for line in lines:
            await send({"type": "http.response.body", "body": orjson.dumps(line) + b"\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _keep(self, req: dict[str, Any]) -> None:
        self.state.bodies.append(req)
        del self.state.bodies[:-50]


def _user(req: dict[str, Any]) -> str:
    return "\n".join(str(m.get("content", "")) for m in req.get("messages", []) if isinstance(m, dict) and m.get("role") == "user")


async def _reply(send: Any, status: int, payload: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    data = orjson.dumps(payload)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
