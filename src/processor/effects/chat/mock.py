"""A deterministic chat model for development, tests and `demo`.

The answer follows the request's JSON schema and depends only on the claim text (a hash
of it picks enum values): the same claim always gets the same answer. Names come from the
text itself: capitalised word pairs for people, the longest words for topics, so `demo`
prints something readable.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson
import trio

from processor.effects.chat.base import ChatAnswer, ChatRequest, estimate_tokens
from processor.effects.chat.metrics import ChatMetrics
from processor.pure.triage import CLAIM_CLOSE, CLAIM_OPEN

_PERSON = re.compile(r"\b([A-ZÀ-Ý][a-zà-ÿ]+(?:\s+(?:da|de|do|dos|das)?\s*[A-ZÀ-Ý][a-zà-ÿ]+)+)")
_WORD = re.compile(r"[A-Za-zÀ-ÿ]{5,}")


def claim_text(user: str) -> str:
    """The claim between the delimiters (the whole message when there are none)."""
    start, end = user.find(CLAIM_OPEN), user.rfind(CLAIM_CLOSE)
    return user[start + len(CLAIM_OPEN) : end].strip() if 0 <= start < end else user


def mock_answer(schema: dict[str, Any], text: str) -> Any:
    """A value valid per `schema` (the subset the triage schemas use), derived from `text`."""
    digest = hashlib.sha256(text.encode()).digest()
    return _value(schema, (), text, digest)


def _value(schema: dict[str, Any], path: tuple[str, ...], text: str, digest: bytes) -> Any:
    if "enum" in schema:
        choices = schema["enum"]
        return choices[int.from_bytes(digest[len(path) : len(path) + 4], "big") % len(choices)]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: _value(v, (*path, k), text, digest) for k, v in props.items()}
    if kind == "array":
        names = _people(text) if "personalities" in path else _topics(text)
        item = schema.get("items", {})
        if item.get("type") == "object" and set(item.get("properties", {})) == {"name"}:
            return [{"name": n} for n in names]
        return [_value(item, (*path, "0"), text, digest)]
    if kind == "boolean":
        return True
    if kind in ("integer", "number"):
        return digest[0]
    if path and path[-1] == "description":
        return "Resposta simulada (modo mock) derivada do texto."
    return " ".join(_topics(text)[:1]) or "mock"


def _people(text: str) -> list[str]:
    seen: list[str] = []
    for m in _PERSON.finditer(text):
        name = " ".join(m.group(1).split())
        if name not in seen:
            seen.append(name)
    return seen[:5]


def _topics(text: str) -> list[str]:
    words = sorted({w.lower() for w in _WORD.findall(text)}, key=lambda w: (-len(w), w))
    return [w.capitalize() for w in words[:3]] or ["Geral"]


class MockChat:
    name = "mock"

    def __init__(self, *, metrics: ChatMetrics, latency: float = 0.0) -> None:
        self._metrics = self.metrics = metrics
        self.latency = latency
        self.requests = 0

    async def complete(self, request: ChatRequest) -> ChatAnswer:
        if self.latency:
            await trio.sleep(self.latency)
        else:
            await trio.lowlevel.checkpoint()
        self.requests += 1
        content = orjson.dumps(mock_answer(request.schema, claim_text(request.user))).decode()
        prompt, completion = estimate_tokens(request.system + request.user), estimate_tokens(content)
        self._metrics.requests.labels(self.name, request.model, request.task_type, "success").inc()
        self._metrics.tokens.labels(self.name, request.model, request.task_type, "prompt").inc(prompt)
        self._metrics.tokens.labels(self.name, request.model, request.task_type, "completion").inc(completion)
        return ChatAnswer(content, "stop", prompt, completion, request.model)

    async def check(self, model: str) -> str:
        return f"{model} (mock) answers deterministically"

    async def aclose(self) -> None:
        return None
