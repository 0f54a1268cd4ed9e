"""The backend interface, its error, and the classification every embedding adapter shares.

An adapter never lets a foreign exception out: whatever goes wrong becomes an `EmbedError`
(a `DependencyError` of `Dependency.EMBEDDING`) whose `fault` says what kind of thing went
wrong. Adapters classify; they do not decide what to do about it (that is the policy's job).
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs

from processor.pure import vectors as vec
from processor.pure.faults import Dependency, DependencyError, Fault


class EmbedError(DependencyError):
    """A call to an embedding backend failed; `fault` says what kind of failure it was
    (`param` names the request parameter a PARAMETER fault is about)."""

    dependency = Dependency.EMBEDDING


@attrs.frozen
class RequestLimits:
    max_items: int
    max_tokens: int | None = None  # estimated tokens per request
    max_input_tokens: int | None = None  # estimated tokens per input


@attrs.frozen
class EmbedResult:
    vectors: list[Any]
    prompt_tokens: int | None = None


class EmbeddingBackend(Protocol):
    name: str

    def limits(self, model: str) -> RequestLimits: ...
    def expected_dim(self, model: str) -> int | None: ...
    def learn_dim(self, model: str, dim: int) -> None: ...
    async def embed(self, model: str, texts: Sequence[str], *, timeout: float | None = None) -> EmbedResult: ...
    async def start(self) -> None: ...
    async def probe(self, model: str) -> None: ...
    async def aclose(self) -> None: ...


def estimate_tokens(text: str) -> int:
    """A conservative token estimate without a tokenizer: one token per 3 UTF-8 bytes."""
    return len(text.encode("utf-8")) // 3 + 1


# --- classification of an HTTP error answer ----------------------------------------------

# The setting an operator changes when the server rejects a request parameter.
SETTING_FOR_PARAM = {
    "dimensions": "EMBEDDING_DIMENSIONS",
    "keep_alive": "OLLAMA_KEEP_ALIVE",
    "truncate": "OLLAMA_TRUNCATE / OPENAI_TRUNCATE",
}

# A 400 that names one of our request parameters (not an input): the configuration is wrong.
_PARAM_WORDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"matryoshka|\bdimensions?\b", re.I), "dimensions"),
    (re.compile(r"encoding_format|\bbase64\b", re.I), "encoding_format"),
    (re.compile(r"keep_alive|\bduration\b", re.I), "keep_alive"),
    (re.compile(r"\btruncat", re.I), "truncate"),
)
_UNKNOWN_PARAM = re.compile(
    r"(?:unknown|unrecognized|unsupported|unexpected)\s+(?:request\s+)?(?:parameter|argument|field|option|key)s?"
    r"(?:\s+supplied)?\s*[:=]?\s*['\"`]?([A-Za-z_][\w.]*)?"
    r"|extra (?:inputs|fields) (?:are )?not permitted",
    re.I,
)
_MODEL_MISSING = re.compile(
    r"\bmodel\b[^.]{0,80}?\b(?:not found|does not exist|not exist|unknown|not available|is not supported|not pulled)"
    r"|\bno such model\b|\bunknown model\b|does not support embed|not an embedding model|try pulling it",
    re.I,
)
_BUSY = re.compile(r"server busy|queue (?:is )?full|maximum pending requests|overloaded|at capacity", re.I)
_QUOTA = re.compile(r"insufficient_quota|exceeded your current quota|billing", re.I)


@attrs.frozen
class Classified:
    fault: Fault
    param: str | None = None


def classify_status(
    status: int, message: str, *, code: object = None, type_: object = None, param: object = None
) -> Classified:
    """What an HTTP error answer means (the rows of the table in docs/architecture.md)."""
    if status in (401, 403):
        return Classified(Fault.AUTH)
    if status == 429:
        if _QUOTA.search(f"{code} {type_} {message}"):
            return Classified(Fault.QUOTA)
        return Classified(Fault.RATE_LIMITED)
    if status == 408:
        return Classified(Fault.TIMEOUT)
    if status == 404:
        if code == "model_not_found" or re.search(r"\bmodel\b", message, re.I):
            return Classified(Fault.MODEL_MISSING)
        return Classified(Fault.PARAMETER, "base_url")  # no such endpoint: the URL is wrong
    if status == 405:
        return Classified(Fault.PARAMETER, "base_url")
    if status >= 500:
        if _MODEL_MISSING.search(message):
            return Classified(Fault.MODEL_MISSING)
        if status in (503, 529) or _BUSY.search(message):
            return Classified(Fault.BUSY)
        if status == 504:
            return Classified(Fault.TIMEOUT)
        return Classified(Fault.SERVER)
    if status in (400, 422):
        return _classify_400(message, param)
    if status == 413:
        return Classified(Fault.INPUT)  # the request is too large: a smaller batch may pass
    return Classified(Fault.PARAMETER)  # any other 4xx: the request as we build it is refused


def _classify_400(message: str, param: object) -> Classified:
    if isinstance(param, str) and param:
        if param == "input" or param.startswith(("input[", "input.")):
            return Classified(Fault.INPUT)
        if param == "model":
            return Classified(Fault.MODEL_MISSING)
        return Classified(Fault.PARAMETER, param)
    if _MODEL_MISSING.search(message):
        return Classified(Fault.MODEL_MISSING)
    for pattern, name in _PARAM_WORDS:
        if pattern.search(message):
            return Classified(Fault.PARAMETER, name)
    m = _UNKNOWN_PARAM.search(message)
    if m:
        return Classified(Fault.PARAMETER, m.group(1) or "unknown")
    return Classified(Fault.INPUT)


def parameter_hint(param: str | None, base_url_setting: str) -> str:
    """The setting to change for a PARAMETER fault, as a short clause."""
    if param == "base_url":
        return f"check {base_url_setting}"
    setting = SETTING_FOR_PARAM.get(param or "")
    if setting:
        return f"the server rejects `{param}`: change {setting}"
    return f"the server rejects the request parameter `{param or '?'}`"


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The server's requested delay: `retry-after-ms`, `retry-after` (seconds or an HTTP date)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            x = float(raw) * scale
        except ValueError:
            if name != "retry-after":
                continue
            try:
                x = email.utils.parsedate_to_datetime(raw).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                continue
        if math.isfinite(x):
            return max(0.0, x)
    return None


def checked_vectors(
    raw: Any, n_inputs: int, expected_dim: int | None, *, who: str, dimension_hint: Callable[[int], str]
) -> tuple[list[list[float]], int]:
    """The vectors of a 2xx answer, or EmbedError MALFORMED / DIMENSION for the whole batch."""
    verdict = vec.check_answer(raw, n_inputs, expected_dim)
    if isinstance(verdict, vec.AnswerBad):
        if verdict.dimension:
            raise EmbedError(f"{who}: {verdict.reason} — {dimension_hint(verdict.size)}", Fault.DIMENSION, param="dimensions")
        raise EmbedError(f"{who} returned a malformed answer: {verdict.reason}", Fault.MALFORMED)
    return verdict.vectors, verdict.dim


def short(text: str, limit: int = 300) -> str:
    """One line, bounded: safe to put in a message."""
    return " ".join(text.split())[:limit]
