"""Poll the pending list as a stream and parse each entry (pure), taking tasks only while
there is room. A task whose content is defective goes straight to the reporter as
`failed`; a type this worker does not run, or a model it cannot serve, stays pending.

The stage's port is `IntakePorts`: the task API, the backend board (breakers, models it
cannot serve), the book, the admission (its pause), the task kinds and the routing,
metrics, the retry schedule, the wall clock, the lifecycle's `stopping`, and the report
stage's `deliver` (for rejected tasks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import orjson
import trio

from processor.board import Admission, BackendBoard
from processor.book import Book
from processor.effects.api import ApiError, TaskApi
from processor.effects.logs import get_logger
from processor.effects.metrics import Metrics
from processor.kinds.base import Defect, TaskKind, Work
from processor.pure import pacing
from processor.pure.lifecycle import Outcome
from processor.pure.tasks import (
    TEXT_EMBEDDING,
    Rejected,
    RejectReason,
    Routing,
    Skipped,
    Task,
    parse_created_at,
    parse_entry,
)
from processor.runtime import RetryConfig
from processor.stages.report import Deliver

LOG_ONCE_MAX = 10_000


@attrs.frozen
class IntakePorts:
    """What the intake stage touches."""

    api: TaskApi
    board: BackendBoard
    book: Book
    admission: Admission
    kinds: Mapping[str, TaskKind]
    routing: Routing
    metrics: Metrics
    retry: RetryConfig
    wall: Callable[[], float]
    stopping: trio.Event
    deliver: Deliver
    polling_interval_seconds: float = 30.0


def _idle_until(p: IntakePorts) -> float | None:
    """Trio time until which polling would be pointless (API breaker open, every backend
    refusing), or None."""
    blocked = [p.api.guard.blocked_until()]
    guards = list(p.board.guards.values())
    if guards and all(g.blocked_until() for g in guards):
        blocked.append(min(g.blocked_until() or 0.0 for g in guards))
    return max((b for b in blocked if b), default=None)


async def poller(p: IntakePorts, intake: trio.MemorySendChannel[Work], rejects: trio.MemorySendChannel[list[str]]) -> None:
    log = get_logger("daemon").bind(component="intake")
    logged_once: set[object] = set()
    failures = 0
    async with intake, rejects:
        while not p.stopping.is_set():
            await p.book.wait_for_room(p.stopping)
            if p.admission.paused:
                await p.admission.sleep_while_paused(p.stopping)
                continue
            if p.stopping.is_set():
                break
            until = _idle_until(p)
            if until is not None:
                with trio.move_on_at(until):
                    await p.stopping.wait()
                continue
            try:
                new, seen = await poll_once(p, intake, rejects, logged_once)
            except ApiError as exc:
                failures += 1
                delay = p.retry.backoff(failures)
                log.warning("poll_failed", error=str(exc), status=exc.status, retry_in=round(delay, 2))
                with trio.move_on_after(max(delay, 0.05)):
                    await p.stopping.wait()
                continue
            failures = 0
            p.metrics.last_poll_success.set(p.wall())
            outcome = pacing.PollOutcome.NEW_WORK if new else pacing.PollOutcome.NOTHING_NEW
            if new:
                log.info("poll", new=new, read=seen, held=len(p.book))
            else:
                log.debug("poll", new=0, read=seen)
            delay = pacing.poll_delay(outcome, p.polling_interval_seconds, p.retry.rng.random())
            if delay > 0:
                with trio.move_on_after(delay):
                    await p.stopping.wait()


def _work(p: IntakePorts, raw: object, task: Task) -> Work | Defect:
    """The embedding envelope parsed by `parse_entry`; other kinds parse their own content."""
    return Work(task.id, "text_embedding", task.text, task.model, task.backend, created_at=task.created_at)


_EMBEDDING = (TEXT_EMBEDDING,)


def kind_entry(p: IntakePorts, raw: dict[str, Any], task_id: str, task_type: str) -> Work | Rejected:
    """A task of a kind other than embeddings: the kind parses its content and, when it can
    (`route`), says which backend and model serve it; else the embedding routing applies."""
    kind = p.kinds[task_type]
    content = kind.parse(raw.get("content"))
    if isinstance(content, Defect):
        return Rejected(task_id, RejectReason.INVALID_CONTENT, content.detail)
    route = getattr(kind, "route", None)
    if route is not None:
        backend, model = route(content)
    else:
        model = content.model or p.routing.default_model
        found = p.routing.backend_for(model)
        if found is None:
            return Rejected(task_id, RejectReason.UNSUPPORTED_MODEL, f"model {model[:100]!r} is not served in this mode")
        backend = found
    return Work(task_id, task_type, content.text, model, backend, content.params, parse_created_at(raw.get("createdAt")),
                requested_model=content.model if content.model and content.model != model else None)


async def poll_once(
    p: IntakePorts,
    intake: trio.MemorySendChannel[Work],
    rejects: trio.MemorySendChannel[list[str]],
    logged_once: set[object],
) -> tuple[int, int]:
    """One streamed read of the pending list. Returns (tasks taken, entries read)."""
    log = get_logger("daemon").bind(component="intake")
    new = seen = 0
    room = p.book.room_left()
    async with p.api.pending() as entries:
        async for raw in entries:
            seen += 1
            parsed: Task | Work | Rejected | Skipped = parse_entry(raw, p.routing, _EMBEDDING if TEXT_EMBEDDING in p.kinds else ())
            if isinstance(parsed, Skipped) and parsed.id is not None and parsed.type in p.kinds:
                parsed = kind_entry(p, raw, parsed.id, parsed.type)  # another kind: it parses its own content
            if isinstance(parsed, Task | Work):
                if p.book.known(parsed.id):
                    continue
                if room <= 0 or p.stopping.is_set():
                    break  # stop reading: memory stays bounded whatever the list's size
                work = _work(p, raw, parsed) if isinstance(parsed, Task) else parsed
                if isinstance(work, Defect):
                    parsed = Rejected(parsed.id, RejectReason.INVALID_CONTENT, work.detail)
                elif (why := p.board.model_unusable(work.model)) is not None:
                    _unservable(p, work.id, work.model, why, logged_once, log)
                    continue
                else:
                    p.book.take(work)
                    intake.send_nowait(work)
                    room -= 1
                    new += 1
                    continue
            if isinstance(parsed, Rejected):
                await _rejected(p, raw, parsed, rejects, logged_once, log)
            elif isinstance(parsed, Skipped):
                _skipped(p, parsed, logged_once, log)
    p.metrics.backlog.set(seen)
    if new:
        p.metrics.stage_tasks.labels("taken").inc(new)
    return new, seen


async def _rejected(p: IntakePorts, raw: object, parsed: Rejected, rejects: trio.MemorySendChannel[list[str]],
                    logged_once: set[object], log: Any) -> None:
    """A defect: reported `failed` with its reason when it has a usable id, else logged and
    counted once per distinct entry. A model this deployment does not serve is no defect."""
    if parsed.reason is RejectReason.UNSUPPORTED_MODEL and parsed.id is not None:
        _unservable(p, parsed.id, _model_of(raw), parsed.detail, logged_once, log)
        return
    if parsed.id is None:
        fingerprint = hash(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS, default=str))
        if fingerprint not in logged_once and len(logged_once) < LOG_ONCE_MAX:
            logged_once.add(fingerprint)
            p.metrics.rejected.labels(parsed.reason.value).inc()
            log.warning("entry_rejected", reason=parsed.reason.value, detail=parsed.detail)
        return
    if p.book.known(parsed.id):
        return
    p.metrics.rejected.labels(parsed.reason.value).inc()
    log.warning("task_rejected", task_id=parsed.id, reason=parsed.reason.value, detail=parsed.detail)
    p.book.take_id(parsed.id)
    await p.deliver({parsed.id: Outcome.failure(parsed.detail)})
    await rejects.send([parsed.id])


def _skipped(p: IntakePorts, parsed: Skipped, logged_once: set[object], log: Any) -> None:
    """A type this worker does not run: left pending for one that does, logged once."""
    if parsed.id not in logged_once and len(logged_once) < LOG_ONCE_MAX:
        logged_once.add(parsed.id or "")
        p.metrics.skipped.labels(parsed.type).inc()
        log.info("task_skipped", task_id=parsed.id, type=parsed.type, why="type not handled by this processor; left pending")


def _model_of(raw: object) -> str:
    content = raw.get("content") if isinstance(raw, dict) else None
    model = content.get("model") if isinstance(content, dict) else None
    return model[:100] if isinstance(model, str) else "?"


def _unservable(p: IntakePorts, task_id: str, model: str, why: str, logged_once: set[object], log: object) -> None:
    """Left pending, counted per model (bounded), named in /health."""
    key = ("unservable", task_id)
    if key in logged_once or len(logged_once) >= LOG_ONCE_MAX:
        return
    logged_once.add(key)
    p.metrics.unservable.labels(p.board.mark_unservable(model, why, retry_later=False)).inc()
    p.metrics.skipped.labels("unservable_model").inc()
    log.info("task_left_pending", task_id=task_id, model=model, why=why)  # type: ignore[attr-defined]
