"""Poll the pending list as a stream and parse each entry (pure), taking tasks only while
there is room. A task whose content is defective goes straight to the reporter as
`failed`; a type this worker does not run, or a model it cannot serve, stays pending."""

from __future__ import annotations

from typing import Any

import orjson
import trio

from processor.effects.api import ApiError
from processor.kinds.base import Defect, Work
from processor.pure import pacing
from processor.pure.lifecycle import Outcome
from processor.pure.tasks import TEXT_EMBEDDING, Rejected, RejectReason, Skipped, Task, parse_created_at, parse_entry
from processor.runtime import Runtime

LOG_ONCE_MAX = 10_000


def _idle_until(rt: Runtime) -> float | None:
    """Trio time until which polling would be pointless (API breaker open, every backend
    refusing), or None."""
    blocked = [rt.api.guard.blocked_until()]
    guards = list(rt.board.guards.values())
    if guards and all(g.blocked_until() for g in guards):
        blocked.append(min(g.blocked_until() or 0.0 for g in guards))
    return max((b for b in blocked if b), default=None)


async def poller(rt: Runtime, intake: trio.MemorySendChannel[Work], rejects: trio.MemorySendChannel[list[str]]) -> None:
    log = rt.log.bind(component="intake")
    logged_once: set[object] = set()
    failures = 0
    async with intake, rejects:
        while not rt.stopping.is_set():
            await rt.book.wait_for_room(rt.stopping)
            if rt.admission.paused:
                await rt.admission.sleep_while_paused(rt.stopping)
                continue
            if rt.stopping.is_set():
                break
            until = _idle_until(rt)
            if until is not None:
                with trio.move_on_at(until):
                    await rt.stopping.wait()
                continue
            try:
                new, seen = await poll_once(rt, intake, rejects, logged_once)
            except ApiError as exc:
                failures += 1
                delay = rt.backoff(failures)
                log.warning("poll_failed", error=str(exc), status=exc.status, retry_in=round(delay, 2))
                with trio.move_on_after(max(delay, 0.05)):
                    await rt.stopping.wait()
                continue
            failures = 0
            rt.metrics.last_poll_success.set(rt.wall())
            outcome = pacing.PollOutcome.NEW_WORK if new else pacing.PollOutcome.NOTHING_NEW
            if new:
                log.info("poll", new=new, read=seen, held=len(rt.book))
            else:
                log.debug("poll", new=0, read=seen)
            delay = pacing.poll_delay(outcome, rt.s.polling_interval_seconds, rt.rng.random())
            if delay > 0:
                with trio.move_on_after(delay):
                    await rt.stopping.wait()


def _work(rt: Runtime, raw: object, task: Task) -> Work | Defect:
    """The embedding envelope parsed by `parse_entry`; other kinds parse their own content."""
    return Work(task.id, "text_embedding", task.text, task.model, task.backend, created_at=task.created_at)


_EMBEDDING = (TEXT_EMBEDDING,)


def kind_entry(rt: Runtime, raw: dict[str, Any], task_id: str, task_type: str) -> Work | Rejected:
    """A task of a kind other than embeddings: the kind parses its content and, when it can
    (`route`), says which backend and model serve it; else the embedding routing applies."""
    kind = rt.kinds[task_type]
    content = kind.parse(raw.get("content"))
    if isinstance(content, Defect):
        return Rejected(task_id, RejectReason.INVALID_CONTENT, content.detail)
    route = getattr(kind, "route", None)
    if route is not None:
        backend, model = route(content)
    else:
        model = content.model or rt.routing.default_model
        found = rt.routing.backend_for(model)
        if found is None:
            return Rejected(task_id, RejectReason.UNSUPPORTED_MODEL, f"model {model[:100]!r} is not served in this mode")
        backend = found
    return Work(task_id, task_type, content.text, model, backend, content.params, parse_created_at(raw.get("createdAt")),
                requested_model=content.model if content.model and content.model != model else None)


async def poll_once(
    rt: Runtime,
    intake: trio.MemorySendChannel[Work],
    rejects: trio.MemorySendChannel[list[str]],
    logged_once: set[object],
) -> tuple[int, int]:
    """One streamed read of the pending list. Returns (tasks taken, entries read)."""
    log = rt.log.bind(component="intake")
    new = seen = 0
    room = rt.book.room_left()
    async with rt.api.pending() as entries:
        async for raw in entries:
            seen += 1
            parsed: Task | Work | Rejected | Skipped = parse_entry(raw, rt.routing, _EMBEDDING if TEXT_EMBEDDING in rt.kinds else ())
            if isinstance(parsed, Skipped) and parsed.id is not None and parsed.type in rt.kinds:
                parsed = kind_entry(rt, raw, parsed.id, parsed.type)  # another kind: it parses its own content
            if isinstance(parsed, Task | Work):
                if rt.book.known(parsed.id):
                    continue
                if room <= 0 or rt.stopping.is_set():
                    break  # stop reading: memory stays bounded whatever the list's size
                work = _work(rt, raw, parsed) if isinstance(parsed, Task) else parsed
                if isinstance(work, Defect):
                    parsed = Rejected(parsed.id, RejectReason.INVALID_CONTENT, work.detail)
                elif (why := rt.board.model_unusable(work.model)) is not None:
                    _unservable(rt, work.id, work.model, why, logged_once, log)
                    continue
                else:
                    rt.book.take(work)
                    intake.send_nowait(work)
                    room -= 1
                    new += 1
                    continue
            if isinstance(parsed, Rejected):
                await _rejected(rt, raw, parsed, rejects, logged_once, log)
            elif isinstance(parsed, Skipped):
                _skipped(rt, parsed, logged_once, log)
    rt.metrics.backlog.set(seen)
    if new:
        rt.metrics.stage_tasks.labels("taken").inc(new)
    return new, seen


async def _rejected(rt: Runtime, raw: object, parsed: Rejected, rejects: trio.MemorySendChannel[list[str]],
                    logged_once: set[object], log: Any) -> None:
    """A defect: reported `failed` with its reason when it has a usable id, else logged and
    counted once per distinct entry. A model this deployment does not serve is no defect."""
    if parsed.reason is RejectReason.UNSUPPORTED_MODEL and parsed.id is not None:
        _unservable(rt, parsed.id, _model_of(raw), parsed.detail, logged_once, log)
        return
    if parsed.id is None:
        fingerprint = hash(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS, default=str))
        if fingerprint not in logged_once and len(logged_once) < LOG_ONCE_MAX:
            logged_once.add(fingerprint)
            rt.metrics.rejected.labels(parsed.reason.value).inc()
            log.warning("entry_rejected", reason=parsed.reason.value, detail=parsed.detail)
        return
    if rt.book.known(parsed.id):
        return
    rt.metrics.rejected.labels(parsed.reason.value).inc()
    log.warning("task_rejected", task_id=parsed.id, reason=parsed.reason.value, detail=parsed.detail)
    rt.book.take_id(parsed.id)
    await rt.deliver({parsed.id: Outcome.failure(parsed.detail)})
    await rejects.send([parsed.id])


def _skipped(rt: Runtime, parsed: Skipped, logged_once: set[object], log: Any) -> None:
    """A type this worker does not run: left pending for one that does, logged once."""
    if parsed.id not in logged_once and len(logged_once) < LOG_ONCE_MAX:
        logged_once.add(parsed.id or "")
        rt.metrics.skipped.labels(parsed.type).inc()
        log.info("task_skipped", task_id=parsed.id, type=parsed.type, why="type not handled by this processor; left pending")


def _model_of(raw: object) -> str:
    content = raw.get("content") if isinstance(raw, dict) else None
    model = content.get("model") if isinstance(content, dict) else None
    return model[:100] if isinstance(model, str) else "?"


def _unservable(rt: Runtime, task_id: str, model: str, why: str, logged_once: set[object], log: object) -> None:
    """Left pending, counted per model (bounded), named in /health."""
    key = ("unservable", task_id)
    if key in logged_once or len(logged_once) >= LOG_ONCE_MAX:
        return
    logged_once.add(key)
    rt.metrics.unservable.labels(rt.board.mark_unservable(model, why, retry_later=False)).inc()
    rt.metrics.skipped.labels("unservable_model").inc()
    log.info("task_left_pending", task_id=task_id, model=model, why=why)  # type: ignore[attr-defined]
