"""Start-up recovery and stale-claim takeover.

On start, before new work: outbox rows are delivered first (their results are paid for and
may already be applied: they are never released); then journal rows without an outbox row
are released (PATCH pending). Their units go back only when the row says the task never
reached a backend. A row that cannot be processed is quarantined (logged, counted, removed),
never a reason to crash again at every start. While the daemon runs, a release the API did
not take (its PATCH pending failed: the task stays `in_progress` there) is sent again, with
back-off, until it is taken (`release_left`). Then, periodically, tasks left `in_progress`
by a worker that died without its state are handed back to `pending`.
"""

from __future__ import annotations

import trio

from processor.effects.api import ApiError
from processor.effects.store import ClaimRow, OutboxRow
from processor.pure.lifecycle import Event, Outcome
from processor.pure.tasks import OBJECT_ID, parse_created_at
from processor.runtime import Runtime
from processor.stages.report import report_batch


def _valid_id(task_id: object) -> bool:
    return isinstance(task_id, str) and OBJECT_ID.fullmatch(task_id) is not None


async def _quarantine(rt: Runtime, task_id: str, why: str) -> None:
    rt.log.error("state_row_quarantined", component="recovery", task_id=repr(task_id)[:60], why=why)
    rt.metrics.rejected.labels("quarantined_state_row").inc()
    try:
        await rt.journal.finish([task_id])
    except Exception as exc:
        rt.log.warning("quarantine_failed", component="recovery", error=str(exc))


def _outcome(row: OutboxRow) -> Outcome:
    if row.state == "succeeded":
        return Outcome.success(row.result)
    return Outcome.failure(row.reason or "failed")


async def recover(rt: Runtime) -> None:
    log = rt.log.bind(component="recovery")
    try:
        outbox = rt.journal.outbox()
        orphans = rt.journal.orphan_claims()
    except Exception as exc:
        log.error("state_unreadable", error=str(exc))
        return
    if outbox:
        log.info("outbox_redelivery", count=len(outbox))
        ids = []
        for row in outbox:
            if not _valid_id(row.task_id) or row.state not in ("succeeded", "failed"):
                await _quarantine(rt, row.task_id, "invalid id or state in the outbox")
                continue
            rt.book.take_id(row.task_id)
            rt.book.fire([row.task_id], Event.RECOVERED_RESULT, outcome=_outcome(row))
            rt.book.computed_at[row.task_id] = row.computed_at
            ids.append(row.task_id)
        for i in range(0, len(ids), 256):
            await report_batch(rt, ids[i : i + 256])
    if orphans:
        log.info("journal_release", count=len(orphans))
        ids = []
        for claim in orphans:
            if not _valid_id(claim.task_id):
                await _quarantine(rt, claim.task_id, "invalid id in the journal")
                continue
            rt.book.take_id(claim.task_id)
            _recovered(rt, claim)
            ids.append(claim.task_id)
        await rt.book.release(ids, "recovered_at_start")
    rt.metrics.in_flight.set(len(rt.book))


def _recovered(rt: Runtime, claim: ClaimRow) -> None:
    if claim.dispatched or claim.reserved_at is None:
        rt.book.fire([claim.task_id], Event.RECOVERED_DISPATCHED)  # may have reached a backend: units stay spent
    else:
        reservation = rt.admission.limiter.reservation_at(claim.reserved_at)
        rt.book.fire([claim.task_id], Event.RECOVERED_CLAIM, charges=(("global", reservation),))


async def release_left(rt: Runtime, *, every: float = 1.0) -> None:
    """Send again the releases the API did not take (`Book.left`): each such task is
    `in_progress` at the API with its journal row kept, and nobody else would hand it back
    before the stale-claim takeover (RECLAIM_AFTER_SECONDS). Its units were refunded or stay
    spent already: it comes back as dispatched (no refund). With back-off while they fail;
    at shutdown the rows stay for the next start."""
    log = rt.log.bind(component="recovery")
    failures = 0
    while not rt.stopping.is_set():
        with trio.move_on_after(every if failures == 0 else max(every, rt.backoff(failures))):
            await rt.stopping.wait()
        book = rt.book
        ids = sorted(i for i in book.left if book.phase(i) is None)
        book.left.difference_update(ids)
        if rt.stopping.is_set() or not ids:
            continue
        try:
            rows = {c.task_id for c in rt.journal.orphan_claims()}
            ids = await rt.admission.leases.acquire([i for i in ids if i in rows])
        except Exception as exc:
            log.warning("release_retry_failed", error=str(exc), count=len(ids))
            book.left.update(ids)
            failures += 1
            continue
        ids = [i for i in ids if book.phase(i) is None]
        for i in ids:
            book.take_id(i)
            book.fire([i], Event.RECOVERED_DISPATCHED)
        if ids:
            released = await book.release(ids, "release_retry")
            failures = 0 if released == len(ids) else failures + 1


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
    async with rt.api.by_state("in_progress") as entries:
        async for raw in entries:
            if not isinstance(raw, dict):
                continue
            tid = raw.get("_id")
            if not _valid_id(tid) or rt.book.phase(tid) is not None:  # type: ignore[arg-type]
                continue
            updated = parse_created_at(raw.get("updatedAt"))
            if updated is None or now - updated >= older_than:
                candidates.append(tid)  # type: ignore[arg-type]
    if not candidates:
        return 0
    live = await rt.admission.leases.live(candidates)
    stale = [t for t in candidates if t not in live and rt.book.phase(t) is None]
    if not stale:
        return 0
    taken = await rt.admission.leases.acquire(stale)
    released = 0
    for tid in taken:
        try:
            await rt.api.patch(tid, "pending")
            released += 1
        except ApiError as exc:
            log.warning("reclaim_failed", task_id=tid, error=str(exc))
    await rt.admission.leases.release(taken)
    if released:
        rt.metrics.released.labels("stale_claim").inc(released)
        log.warning("stale_claims_reclaimed", count=released, older_than=older_than)
    return released
