"""The backend interface and its error vocabulary."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Protocol

import attrs


class EmbedErrorKind(enum.Enum):
    INPUT = "input"  # one of the inputs is bad: split the batch to find it, fail only that task
    MODEL = "model"  # the model is unknown / unavailable: fail that model's tasks with the message
    TRANSIENT = "transient"  # 5xx, connection error, queue full: retry per policy
    TIMEOUT = "timeout"  # split the batch before retrying
    RATE_LIMITED = "rate_limited"  # 429 with a delay: pace, don't trip the breaker
    BACKEND_DOWN = "backend_down"  # bad key, quota exhausted: release claims, go not-ready


class EmbedError(Exception):
    """A backend call failed; `kind` says what the caller should do about it."""

    def __init__(
        self, message: str, kind: EmbedErrorKind, *, status: int | None = None, retry_after: float | None = None,
        quota: bool = False, unreachable: bool = False,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after
        self.quota = quota  # 429 insufficient_quota: the account is out of credit
        self.unreachable = unreachable  # no answer at all: about the backend, never the task


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
    async def embed(self, model: str, texts: Sequence[str]) -> EmbedResult: ...
    async def start(self) -> None: ...
    async def probe(self, model: str) -> None: ...
    async def aclose(self) -> None: ...


def estimate_tokens(text: str) -> int:
    """A conservative token estimate without a tokenizer: one token per 3 UTF-8 bytes."""
    return len(text.encode("utf-8")) // 3 + 1
