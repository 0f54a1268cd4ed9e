"""The error vocabulary every adapter classifies into.

An adapter never lets a foreign exception out: whatever goes wrong in a call to a
dependency becomes a `DependencyError` whose `fault` says *what kind* of thing went wrong.
The adapter does not decide what to do about it; `processor.pure.policy` maps
(dependency, fault) to an action, and the stage carries the action out.
"""

from __future__ import annotations

import enum


class Dependency(enum.Enum):
    """Who answered (or failed to)."""

    TASK_API = "task_api"
    TOKEN = "token_endpoint"
    EMBEDDING = "embedding"  # an embedding backend (OpenAI, Ollama, local, mock)
    CHAT = "chat"  # a chat backend (OpenAI, Ollama, mock)
    WIKIDATA = "wikidata"
    STORE = "store"  # SQLite journal / outbox / rate-limit counters
    REDIS = "redis"


class Fault(enum.Enum):
    """What went wrong, as far as the adapter can tell from the answer alone."""

    # -- about one input / one task ------------------------------------------------------
    INPUT = "input"  # the server rejected one of the inputs (too long, empty, unreadable)
    BAD_ANSWER = "bad_answer"  # a model's answer for one task is unusable (invalid JSON, schema, refusal, cut off)
    # -- about the configuration ---------------------------------------------------------
    PARAMETER = "parameter"  # the server rejected a request parameter (e.g. `dimensions` out of range)
    DIMENSION = "dimension"  # vectors of another size than configured (server ignores `dimensions`)
    MODEL_MISSING = "model_missing"  # this deployment cannot serve the model (unknown, not pulled, no capability)
    AUTH = "auth"  # 401/403: credentials refused
    QUOTA = "quota"  # the account is out of credit (429 insufficient_quota)
    # -- transient -------------------------------------------------------------------------
    RATE_LIMITED = "rate_limited"  # 429 rate limit; `retry_after` when the server said
    BUSY = "busy"  # 503 / queue full: the server is fine, just busy; never a task's defect
    SERVER = "server"  # other 5xx: possibly caused by one input of a batch
    TIMEOUT = "timeout"  # no complete answer in time
    UNREACHABLE = "unreachable"  # connection refused, reset, DNS
    MALFORMED = "malformed"  # a 2xx whose body is not what the contract says
    # -- task API answers to a PATCH ---------------------------------------------------------
    REFUSED = "refused"  # 4xx on a report: the platform refused the result (state may be saved)
    NOT_FOUND = "not_found"  # 404: no such task
    TOKEN_EXPIRED = "token_expired"  # 401 from the task API: refresh the token once


class DependencyError(Exception):
    """A call to a dependency failed. `fault` says what kind of failure it was.

    `status` is the HTTP status when there was one, `retry_after` the server's requested
    delay in seconds (None when it gave none), `param` the request parameter a 400 named.
    The message is safe to log: adapters never put secrets in it.
    """

    dependency: Dependency = Dependency.EMBEDDING

    def __init__(
        self,
        message: str,
        fault: Fault,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.fault = fault
        self.status = status
        self.retry_after = retry_after
        self.param = param

    @property
    def kind(self) -> Fault:
        return self.fault
