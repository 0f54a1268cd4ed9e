"""Poll the pending list as a stream and parse each entry (pure), taking tasks only while
there is room. Rejections with an id go straight to the reporter as `failed`."""

from __future__ import annotations

import orjson
import trio

from processor.effects.api import ApiError
from processor.pure import pacing
from processor.pure.tasks import Backend, Rejected, Skipped, Task, parse_entry
from processor.runtime import Outcome, Runtime

LOG_ONCE_MAX = 10_000


async def poller(rt: Runtime, intake: trio.MemorySendChannel[Task], rejects: trio.MemorySendChannel[list[Outcome]]) -> None:
    log = rt.log.bind(component="intake")
    logged_once: set[object] = set()
    failures = 0
    async with intake, rejects:
        while not rt.stopping.is_set():
            await rt.wait_for_room()
            if trio.current_time() < rt.admission_paused_until:
                with trio.move_on_at(rt.admission_paused_until):
                    await rt.stopping.wait()
                continue
            if rt.stopping.is_set():
                break
            # API breaker open: no polling until it half-opens. Every backend down: tasks
            # stay pending until one of them may take a probe.
            blocked = [rt.api.guard.blocked_until()]
            if rt.backend_guards and all(g.blocked_until() for g in rt.backend_guards.values()):
                blocked.append(min(g.blocked_until() or 0.0 for g in rt.backend_guards.values()))
            until = max((b for b in blocked if b), default=None)
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
                log.info("poll", new=new, read=seen, held=len(rt.held))
            else:
                log.debug("poll", new=0, read=seen)
            delay = pacing.poll_delay(outcome, rt.s.polling_interval_seconds, rt.rng.random())
            if delay > 0:
                with trio.move_on_after(delay):
                    await rt.stopping.wait()


async def poll_once(
    rt: Runtime,
    intake: trio.MemorySendChannel[Task],
    rejects: trio.MemorySendChannel[list[Outcome]],
    logged_once: set[object],
) -> tuple[int, int]:
    """One streamed read of the pending list. Returns (tasks taken, entries read)."""
    log = rt.log.bind(component="intake")
    new = seen = 0
    room = rt.room_left()
    async with rt.api.pending() as entries:
        async for raw in entries:
            seen += 1
            parsed = parse_entry(raw, rt.routing)
            if isinstance(parsed, Task):
                if rt.is_known(parsed.id):
                    continue
                if room <= 0 or rt.stopping.is_set():
                    break  # stop reading: memory stays bounded whatever the list's size
                rt.hold(parsed)
                intake.send_nowait(parsed)
                room -= 1
                new += 1
            elif isinstance(parsed, Rejected):
                if parsed.id is None:
                    # cannot be reported: log and count once per distinct entry
                    fingerprint = hash(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS, default=str))
                    if fingerprint not in logged_once and len(logged_once) < LOG_ONCE_MAX:
                        logged_once.add(fingerprint)
                        rt.metrics.rejected.labels(parsed.reason.value).inc()
                        log.warning("entry_rejected", reason=parsed.reason.value, detail=parsed.detail)
                    continue
                if rt.is_known(parsed.id):
                    continue
                rt.metrics.rejected.labels(parsed.reason.value).inc()
                log.warning("task_rejected", task_id=parsed.id, reason=parsed.reason.value, detail=parsed.detail)
                rt.hold(Task(parsed.id, "", "", Backend.MOCK))  # held only so a re-poll skips it
                await rejects.send([Outcome(parsed.id, "failed", None, parsed.detail)])
            elif isinstance(parsed, Skipped):
                if parsed.id not in logged_once and len(logged_once) < LOG_ONCE_MAX:
                    logged_once.add(parsed.id or "")
                    rt.metrics.skipped.labels(parsed.type).inc()
                    log.info("task_skipped", task_id=parsed.id, type=parsed.type, why="type not handled by this processor; left pending")
    rt.metrics.backlog.set(seen)
    if new:
        rt.metrics.stage_tasks.labels("taken").inc(new)
    return new, seen
