"""Readiness as a pure function of what the daemon knows: facts in, reasons out.

`/ready` is 200 when `reasons(facts)` is empty, else 503 with the reasons; the
`processor_ready` gauge is computed from the same function at scrape time. Nothing here
reads a clock: ages come in as numbers.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class BackendFacts:
    name: str
    breaker_open: bool = False
    unusable: str | None = None  # configuration / credentials (why)
    quota: str | None = None  # out of credit (why)
    down: str | None = None  # did not answer its last call (why)


@attrs.frozen
class Facts:
    started: bool = True
    shutting_down: bool = False
    token: bool = True
    token_error: str | None = None
    api_answered_ago: float | None = 0.0  # seconds since the task API last answered (None: never)
    api_window: float = 90.0
    api_breaker_open: bool = False
    backends: tuple[BackendFacts, ...] = ()
    store_ok: bool = True
    store_error: str | None = None
    redis_error: str | None = None


def reasons(f: Facts) -> list[str]:
    """Why the daemon is not ready (empty: ready)."""
    if not f.started:
        return ["starting"]
    out = []
    if f.shutting_down:
        out.append("shutting down")
    if not f.token:
        out.append(f"no access token ({f.token_error or 'not obtained yet'})")
    if f.api_answered_ago is None or f.api_answered_ago > f.api_window:
        out.append(f"task API has not answered within {f.api_window:g}s")
    if f.api_breaker_open:
        out.append("task API circuit breaker open")
    for b in f.backends:
        if b.breaker_open:
            out.append(f"{b.name} backend circuit breaker open" + (f": {b.unusable}" if b.unusable else ""))
        if b.quota:
            out.append(f"{b.name} quota exhausted: {b.quota}")
        if b.down and not (b.breaker_open and b.unusable == b.down):
            out.append(f"{b.name} backend: {b.down}")
    if not f.store_ok:
        out.append(f"state store not writable: {f.store_error}")
    if f.redis_error:
        out.append(f"redis unavailable: {f.redis_error}")
    return out
