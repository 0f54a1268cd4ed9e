"""Structured logs (structlog): JSON by default, one event per line, secrets redacted."""

from __future__ import annotations

import logging
import re
import sys
from collections import deque
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

_PATTERNS = [
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1[REDACTED]"),
    (re.compile(r"(?i)(basic\s+)[A-Za-z0-9+/=]{8,}"), r"\1[REDACTED]"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), "[REDACTED]"),
    (re.compile(r"(?i)((?:client_secret|access_token|api_key|password)[\"']?\s*[=:]\s*[\"']?)[^\s\"'&,}]+"), r"\1[REDACTED]"),
    (re.compile(r"((?:redis|rediss)://[^:/@\s]*:)[^@\s]+@"), r"\1[REDACTED]@"),
]


class Redactor:
    """Removes known secret values and secret-looking patterns from any string.

    It holds only the live secrets, so that it stays small however long the process runs:
    long-lived ones (`add`: client secret, API keys, passwords; at most `max_static`, the
    oldest dropped first) and, per name, the newest `keep` of the ones that are replaced
    from time to time (`rotate`: access tokens, the current and the previous one, since
    requests sent with the previous one may still be logged).
    """

    def __init__(self, *, max_static: int = 32, keep: int = 2) -> None:
        self._max_static = max_static
        self._keep = keep
        self._static: dict[str, None] = {}  # an ordered set
        self._rotating: dict[str, deque[str]] = {}
        self._all: tuple[str, ...] = ()

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= 4:
            self._static.pop(secret, None)
            self._static[secret] = None
            while len(self._static) > self._max_static:
                del self._static[next(iter(self._static))]
            self._rebuild()

    def rotate(self, name: str, secret: str | None) -> None:
        """`secret` is now the current value of `name`; values older than the last `keep` are forgotten."""
        if not secret or len(secret) < 4:
            return
        ring = self._rotating.setdefault(name, deque(maxlen=self._keep))
        if secret not in ring:
            ring.append(secret)
            self._rebuild()

    def discard(self, secret: str | None) -> None:
        self._static.pop(secret or "", None)
        for ring in self._rotating.values():
            if secret in ring:
                ring.remove(secret or "")
        self._rebuild()

    def _rebuild(self) -> None:
        # longest first, so that a secret containing another one is removed whole
        values = {*self._static, *(s for ring in self._rotating.values() for s in ring)}
        self._all = tuple(sorted(values, key=len, reverse=True))

    def __len__(self) -> int:
        return len(self._all)

    def redact(self, text: str) -> str:
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates from a peer: escaped, never a crash
                text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        for s in self._all:
            if s in text:
                text = text.replace(s, "[REDACTED]")
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text

    def _walk(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if depth > 32 and isinstance(value, (dict, list, tuple)):
            return "…"  # deeper than any event of ours: cut, never a RecursionError
        if isinstance(value, dict):
            return {k: self._walk(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._walk(v, depth + 1) for v in value]
        if isinstance(value, BaseException):
            return self.redact(f"{type(value).__name__}: {value}")
        return value

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        return {k: self._walk(v) for k, v in event.items()}


REDACTOR = Redactor()  # logging is process-wide by nature; so is its redaction list


def _render_json(logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
    try:
        return orjson.dumps(event, default=str).decode()
    except TypeError:  # an integer beyond 64 bits, nesting beyond orjson's limit: never raise
        return orjson.dumps({str(k): _plain(v, 0) for k, v in event.items()}, default=str).decode()


def _plain(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        if -(2**63) <= value < 2**64:
            return value
        return str(value) if value.bit_length() < 4000 else f"<integer of {value.bit_length()} bits>"
    if depth > 32:
        return "…"
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return _plain(str(value), depth + 1)


def configure_logging(level: str = "INFO", fmt: str = "json", stream: TextIO | None = None) -> None:
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        REDACTOR,
    ]
    processors.append(_render_json if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(component: str) -> Any:
    return structlog.get_logger().bind(component=component)
