"""Parse raw pending-list entries into tasks, rejections or skips.

`parse_entry` never raises, whatever JSON value it is given: one bad entry must never stop
the others. A `Rejected` with an id is reported `failed` with its reason; one without an id
can only be logged and counted. A `Skipped` task (a type this worker does not run) is
left `pending` for a worker that does.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Container
from datetime import datetime
from typing import Any

import attrs

OBJECT_ID = re.compile(r"^[0-9a-f]{24}$")
MAX_TEXT_CHARS = 10_000
TEXT_EMBEDDING = "text_embedding"


class Backend(enum.Enum):
    OPENAI = "openai"
    OLLAMA = "ollama"
    MOCK = "mock"


class RejectReason(enum.Enum):
    """Why an entry cannot be processed; the value is the metric label."""

    NOT_AN_OBJECT = "not_an_object"
    MISSING_ID = "missing_id"
    INVALID_ID = "invalid_id"
    MISSING_CONTENT = "missing_content"
    INVALID_CONTENT = "invalid_content"
    EMPTY_TEXT = "empty_text"
    TEXT_TOO_LONG = "text_too_long"
    INVALID_MODEL = "invalid_model"
    UNSUPPORTED_MODEL = "unsupported_model"


@attrs.frozen
class Task:
    id: str
    text: str
    model: str
    backend: Backend
    created_at: float | None = None  # epoch seconds, when the API says


@attrs.frozen
class Rejected:
    id: str | None  # a usable id (24 hex) or None
    reason: RejectReason
    detail: str  # a sentence a person can act on


@attrs.frozen
class Skipped:
    id: str | None
    type: str


Parsed = Task | Rejected | Skipped


@attrs.frozen
class Routing:
    """Which backend serves which model, derived from the processing mode.

    `local_models` are served by Ollama (ollama and hybrid modes); `remote` says whether
    other models may go to OpenAI (openai and hybrid); `mock` serves everything.
    """

    default_model: str
    local_models: frozenset[str] = frozenset()
    remote: bool = False
    mock: bool = False

    def backend_for(self, model: str) -> Backend | None:
        if self.mock:
            return Backend.MOCK
        if model in self.local_models or _untagged(model) in self.local_models:
            return Backend.OLLAMA
        if self.remote:
            return Backend.OPENAI
        return None


def _untagged(model: str) -> str:
    """`nomic-embed-text:latest` is the same Ollama model as `nomic-embed-text`."""
    return model[: -len(":latest")] if model.endswith(":latest") else model


def parse_created_at(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def parse_entry(raw: Any, routing: Routing, handled_types: Container[str] = (TEXT_EMBEDDING,)) -> Parsed:
    """Classify one entry of the pending list. Never raises."""
    if not isinstance(raw, dict):
        return Rejected(None, RejectReason.NOT_AN_OBJECT, f"entry is a {type(raw).__name__}, not an object")
    raw_id = raw.get("_id")
    if raw_id is None:
        return Rejected(None, RejectReason.MISSING_ID, "entry has no _id")
    if not isinstance(raw_id, str) or not OBJECT_ID.match(raw_id):
        return Rejected(None, RejectReason.INVALID_ID, f"_id {str(raw_id)[:40]!r} is not a 24-hex ObjectId")
    task_type = raw.get("type")
    if task_type not in handled_types:
        return Skipped(raw_id, str(task_type)[:64])

    content = raw.get("content")
    if content is None:
        return Rejected(raw_id, RejectReason.MISSING_CONTENT, "content is missing or null")
    text: Any
    model: Any
    if isinstance(content, str):
        text, model = content, routing.default_model
    elif isinstance(content, dict):
        text = content.get("text")
        model = content.get("model", routing.default_model)
        if not isinstance(text, str):
            return Rejected(
                raw_id, RejectReason.INVALID_CONTENT,
                f"content.text must be a string, got {type(text).__name__}",
            )
        if model is None:
            model = routing.default_model
        if not isinstance(model, str) or not model.strip():
            return Rejected(raw_id, RejectReason.INVALID_MODEL, "content.model must be a non-empty string")
    else:
        return Rejected(
            raw_id, RejectReason.INVALID_CONTENT,
            f"content must be a string or {{text, model}}, got {type(content).__name__}",
        )
    if not text.strip():
        return Rejected(raw_id, RejectReason.EMPTY_TEXT, "text is empty")
    if len(text) > MAX_TEXT_CHARS:
        return Rejected(
            raw_id, RejectReason.TEXT_TOO_LONG,
            f"text has {len(text)} characters; the limit is {MAX_TEXT_CHARS}",
        )
    backend = routing.backend_for(model)
    if backend is None:
        return Rejected(
            raw_id, RejectReason.UNSUPPORTED_MODEL,
            f"model {model[:100]!r} is not served in this mode; add it to SUPPORTED_MODELS "
            "or use hybrid/openai mode",
        )
    return Task(raw_id, text, model, backend, parse_created_at(raw.get("createdAt")))
