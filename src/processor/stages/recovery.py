"""Start-up recovery and stale-claim takeover.

On start, before new work: outbox rows are delivered first (their results are paid for and
may already be applied: they are never released); then journal rows without an outbox row
are released (PATCH pending) and their units refunded. Then, periodically, tasks left
`in_progress` by a worker that died without its state are handed back to `pending`.
"""

from __future__ import annotations

import trio

from processor.effects.api import ApiError
from processor.pure.tasks import OBJECT_ID, Backend, Task, parse_created_at
from processor.runtime import Held, Outcome, Runtime
from processor.stages.report import report_batch


async def recover(rt: Runtime) -> None:
    log = rt.log.bind(component="recovery")
    outbox = rt.journal.outbox()
    if outbox:
        log.info("outbox_redelivery", count=len(outbox))
        outcomes = []
        for row in outbox:
            rt.held[row.task_id] = Held(Task(row.task_id, "", "", Backend.MOCK, row.created_at), claimed=True, computed=True)
            rt.outbox_oldest[row.task_id] = row.computed_at
            outcomes.append(Outcome(row.task_id, row.state, row.vector, row.reason, row.created_at))
        for i in range(0, len(outcomes), 256):
            await report_batch(rt, outcomes[i : i + 256])
    orphans = rt.journal.orphan_claims()
    if orphans:
        log.info("journal_release", count=len(orphans))
        for claim in orphans:
            h = Held(Task(claim.task_id, claim.text, claim.model, Backend(claim.backend), claim.created_at), claimed=True)
            h.reservation = None if claim.reserved_at is None else rt.limiter.reservation_at(claim.reserved_at)
            rt.held[claim.task_id] = h
        await rt.release([r.task_id for r in orphans], reason="recovered_at_start")
    rt.metrics.in_flight.set(len(rt.held))


async def reclaimer(rt: Runtime, *, interval: float, older_than: float) -> None:
    """Every `interval`, hand back in_progress tasks nobody holds (no record, no live lease)."""
    log = rt.log.bind(component="recovery")
    while not rt.stopping.is_set():
        try:
            await reclaim_once(rt, older_than=older_than)
        except Exception as exc:  # API or Redis unreachable: try again next round
            log.warning("reclaim_scan_failed", error=str(exc))
        with trio.move_on_after(interval):
            await rt.stopping.wait()


async def reclaim_once(rt: Runtime, *, older_than: float) -> int:
    log = rt.log.bind(component="recovery")
    now = rt.wall()
    candidates: list[str] = []
    known = set(rt.held)
    async with rt.api.by_state("in_progress") as entries:
        async for raw in entries:
            if not isinstance(raw, dict):
                continue
            tid = raw.get("_id")
            if not isinstance(tid, str) or not OBJECT_ID.match(tid) or tid in known:
                continue
            updated = parse_created_at(raw.get("updatedAt"))
            if updated is None or now - updated >= older_than:
                candidates.append(tid)
    if not candidates:
        return 0
    live = await rt.leases.live(candidates)
    stale = [t for t in candidates if t not in live and t not in rt.held]
    if not stale:
        return 0
    taken = await rt.leases.acquire(stale)
    released = 0
    for tid in taken:
        try:
            await rt.api.patch(tid, "pending")
            released += 1
        except ApiError as exc:
            log.warning("reclaim_failed", task_id=tid, error=str(exc))
    await rt.leases.release(taken)
    if released:
        rt.metrics.released.labels("stale_claim").inc(released)
        log.warning("stale_claims_reclaimed", count=released, older_than=older_than)
    return released
