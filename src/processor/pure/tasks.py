"""Parse raw pending-list entries into tasks, rejections or skips.

`parse_entry` never raises, whatever value it is given (any JSON value, strings that are
not valid Unicode, `InvalidValue` markers from the stream reader): one bad entry must never
stop the others. It accepts an id only if it is exactly 24 lowercase hex characters, and a
text or model only if it is valid Unicode. A `Rejected` with an id is reported `failed` with its reason; one without an id
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

from processor.pure.jsonstream import InvalidValue, printable, unicode_problem

# \A and \Z: the whole string, whichever of match/fullmatch/search is used (`$` would
# also accept a trailing newline, which then breaks the PATCH URL).
OBJECT_ID = re.compile(r"\A[0-9a-f]{24}\Z")
MAX_TEXT_CHARS = 10_000
TEXT_EMBEDDING = "text_embedding"


class Backend(enum.Enum):
    OPENAI = "openai"
    OLLAMA = "ollama"
    MOCK = "mock"
    LOCAL = "local"


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
    INVALID_TEXT = "invalid_text"  # not valid Unicode (lone surrogates)
    UNREADABLE = "unreadable"  # the entry is not JSON, or too large to read


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
    local: bool = False  # the local model serves every model name

    def backend_for(self, model: str) -> Backend | None:
        if self.mock:
            return Backend.MOCK
        if self.local:
            return Backend.LOCAL
        if model in self.local_models or _untagged(model) in self.local_models:
            return Backend.OLLAMA
        if self.remote:
            return Backend.OPENAI
        return None


def is_object_id(value: object) -> bool:
    """True only for a string of exactly 24 lowercase hex characters."""
    return isinstance(value, str) and len(value) == 24 and OBJECT_ID.fullmatch(value) is not None


def _untagged(model: str) -> str:
    """`nomic-embed-text:latest` is the same Ollama model as `nomic-embed-text`."""
    return model[: -len(":latest")] if model.endswith(":latest") else model


def parse_created_at(value: Any) -> float | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def _type_label(value: Any) -> str:
    if isinstance(value, str):
        return printable(value, 64)
    if value is None:
        return "None"
    return "invalid" if isinstance(value, InvalidValue) else type(value).__name__


def _what(value: Any) -> str:
    return "text that is not valid Unicode" if isinstance(value, InvalidValue) else type(value).__name__


def parse_entry(raw: Any, routing: Routing, handled_types: Container[str] = (TEXT_EMBEDDING,)) -> Parsed:
    """Classify one entry of the pending list. Never raises."""
    envelope = _envelope(raw, handled_types)
    if not isinstance(envelope, str):
        return envelope
    raw_id = envelope
    assert isinstance(raw, dict)
    content = _text_and_model(raw_id, raw.get("content"), routing.default_model)
    if isinstance(content, Rejected):
        return content
    text, model = content
    problem = _text_problem(raw_id, text)
    if problem is not None:
        return problem
    backend = routing.backend_for(model)
    if backend is None:
        return Rejected(
            raw_id, RejectReason.UNSUPPORTED_MODEL,
            f"model {model[:100]!r} is not served in this mode; add it to SUPPORTED_MODELS "
            "or use hybrid/openai mode",
        )
    return Task(raw_id, text, model, backend, parse_created_at(raw.get("createdAt")))


def _envelope(raw: Any, handled_types: Container[str]) -> str | Rejected | Skipped:
    """The entry's id when it is an object with a usable id of a type handled here."""
    if isinstance(raw, InvalidValue):
        return Rejected(None, RejectReason.UNREADABLE, raw.what)
    if not isinstance(raw, dict):
        return Rejected(None, RejectReason.NOT_AN_OBJECT, f"entry is a {type(raw).__name__}, not an object")
    raw_id = raw.get("_id")
    if raw_id is None:
        return Rejected(None, RejectReason.MISSING_ID, "entry has no _id")
    if not is_object_id(raw_id):
        shown = printable(raw_id, 40) if isinstance(raw_id, str) else _what(raw_id)
        return Rejected(None, RejectReason.INVALID_ID, f"_id {shown!r} is not a 24-hex ObjectId")
    task_type = raw.get("type")
    if not isinstance(task_type, str) or task_type not in handled_types:
        return Skipped(raw_id, _type_label(task_type))
    assert isinstance(raw_id, str)
    return raw_id


def _text_and_model(raw_id: str, content: Any, default_model: str) -> tuple[str, str] | Rejected:
    """(text, model) from a bare string or `{text, model}`; the text is checked after."""
    if content is None:
        return Rejected(raw_id, RejectReason.MISSING_CONTENT, "content is missing or null")
    if isinstance(content, InvalidValue):
        return Rejected(raw_id, RejectReason.INVALID_TEXT, f"content {content.what}")
    if isinstance(content, str):
        return content, default_model
    if not isinstance(content, dict):
        return Rejected(
            raw_id, RejectReason.INVALID_CONTENT,
            f"content must be a string or {{text, model}}, got {type(content).__name__}",
        )
    text = content.get("text")
    model = content.get("model", default_model)
    if isinstance(text, InvalidValue):
        return Rejected(raw_id, RejectReason.INVALID_TEXT, f"content.{text.what}")
    if not isinstance(text, str):
        return Rejected(
            raw_id, RejectReason.INVALID_CONTENT,
            f"content.text must be a string, got {type(text).__name__}",
        )
    if model is None:
        model = default_model
    if isinstance(model, InvalidValue) or (isinstance(model, str) and unicode_problem(model) is not None):
        return Rejected(raw_id, RejectReason.INVALID_MODEL, "content.model is not valid Unicode")
    if not isinstance(model, str) or not model.strip():
        return Rejected(raw_id, RejectReason.INVALID_MODEL, "content.model must be a non-empty string")
    return text, model


def _text_problem(raw_id: str, text: str) -> Rejected | None:
    problem = unicode_problem(text)
    if problem is not None:
        return Rejected(raw_id, RejectReason.INVALID_TEXT, f"text {problem}")
    if not text.strip():
        return Rejected(raw_id, RejectReason.EMPTY_TEXT, "text is empty")
    if len(text) > MAX_TEXT_CHARS:
        return Rejected(
            raw_id, RejectReason.TEXT_TOO_LONG,
            f"text has {len(text)} characters; the limit is {MAX_TEXT_CHARS}",
        )
    return None
