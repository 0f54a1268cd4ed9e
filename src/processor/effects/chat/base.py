"""The chat backend interface: one request per task, a JSON answer following a schema."""

from __future__ import annotations

from typing import Any, Protocol

import attrs
import orjson

from processor.pure.faults import Dependency, DependencyError, Fault


class ChatError(DependencyError):
    """A chat call failed; `fault` says what kind of failure (`BAD_ANSWER`: the model
    answered, but not usably: refused, cut off, not JSON)."""

    dependency = Dependency.CHAT


@attrs.frozen
class ChatRequest:
    model: str  # the model to ask (after MODEL_MAP)
    system: str
    user: str
    schema: dict[str, Any]  # strict JSON schema of the answer
    schema_name: str
    task_type: str  # metric label


@attrs.frozen
class ChatAnswer:
    content_json: str  # the model's answer: a JSON text (parsed once to check it is JSON)
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str


class ChatBackend(Protocol):
    name: str
    metrics: Any  # the ChatMetrics it counts on (kinds count bad answers there too)

    async def complete(self, request: ChatRequest) -> ChatAnswer: ...
    async def check(self, model: str) -> str: ...  # a sentence for `check`; raises ChatError
    async def aclose(self) -> None: ...


def checked_json(content: object, *, who: str) -> str:
    """The answer's text when it is a JSON object; else a BAD_ANSWER ChatError."""
    if not isinstance(content, str) or not content.strip():
        raise ChatError(f"{who}: the answer is empty", Fault.BAD_ANSWER)
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise ChatError(f"{who}: the answer is not valid JSON", Fault.BAD_ANSWER) from None
    if not isinstance(value, dict):
        raise ChatError(f"{who}: the answer is not a JSON object", Fault.BAD_ANSWER)
    return content


def estimate_tokens(text: str) -> int:
    return len(text.encode("utf-8")) // 3 + 1
