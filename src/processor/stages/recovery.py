"""Start-up recovery and stale-claim takeover.

On start, before new work: outbox rows are delivered first (their results are paid for and
may already be applied: they are never released); then journal rows without an outbox row
are released (PATCH pending). Their units go back only when the row says the task never
reached a backend. A row that cannot be processed is quarantined (logged, counted, removed),
never a reason to crash again at every start. While the daemon runs, a release the API did
not take (its PATCH pending failed: the task stays `in_progress` there) is sent again, with
back-off, until it is taken (`release_left`). Then, periodically, tasks left `in_progress`
by a worker that died without its state are handed back to `pending`.

The stage's port is `RecoveryPorts`: the journal, the book, the admission (leases, the
limiter's reservations), the task API, metrics, the retry schedule, the wall clock, the
lifecycle's `stopping`, and the report stage's `Reporter` (outbox rows are reported first).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from processor.board import Admission
from processor.book import Book
from processor.effects.api import ApiError, TaskApi
from processor.effects.logs import get_logger
from processor.effects.metrics import Metrics
from processor.effects.store import ClaimRow, JournalStore, OutboxRow
from processor.pure.lifecycle import Event, Outcome
from processor.pure.tasks import OBJECT_ID, parse_created_at
from processor.runtime import RetryConfig
from processor.stages.report import Reporter, report_batch


@attrs.frozen
class RecoveryPorts:
    """What the recovery stage touches."""

    journal: JournalStore
    book: Book
    admission: Admission
    api: TaskApi
    metrics: Metrics
    retry: RetryConfig
    wall: Callable[[], float]
    stopping: trio.Event
    reporter: Reporter


def _valid_id(task_id: object) -> bool:
    return isinstance(task_id, str) and OBJECT_ID.fullmatch(task_id) is not None


async def _quarantine(p: RecoveryPorts, task_id: str, why: str) -> None:
    log = get_logger("daemon")
    log.error("state_row_quarantined", component="recovery", task_id=repr(task_id)[:60], why=why)
    p.metrics.rejected.labels("quarantined_state_row").inc()
    try:
        await p.journal.finish([task_id])
    except Exception as exc:
        log.warning("quarantine_failed", component="recovery", error=str(exc))


def _outcome(row: OutboxRow) -> Outcome:
    if row.state == "succeeded":
        return Outcome.success(row.result)
    return Outcome.failure(row.reason or "failed")


async def recover(p: RecoveryPorts) -> None:
    log = get_logger("daemon").bind(component="recovery")
    try:
        outbox = p.journal.outbox()
        orphans = p.journal.orphan_claims()
    except Exception as exc:
        log.error("state_unreadable", error=str(exc))
        return
    if outbox:
        log.info("outbox_redelivery", count=len(outbox))
        ids = []
        for row in outbox:
            if not _valid_id(row.task_id) or row.state not in ("succeeded", "failed"):
                await _quarantine(p, row.task_id, "invalid id or state in the outbox")
                continue
            p.book.take_id(row.task_id)
            p.book.fire([row.task_id], Event.RECOVERED_RESULT, outcome=_outcome(row))
            p.book.computed_at[row.task_id] = row.computed_at
            ids.append(row.task_id)
        for i in range(0, len(ids), 256):
            await report_batch(p.reporter, ids[i : i + 256])
    if orphans:
        log.info("journal_release", count=len(orphans))
        ids = []
        for claim in orphans:
            if not _valid_id(claim.task_id):
                await _quarantine(p, claim.task_id, "invalid id in the journal")
                continue
            p.book.take_id(claim.task_id)
            _recovered(p, claim)
            ids.append(claim.task_id)
        await p.book.release(ids, "recovered_at_start")
    p.metrics.in_flight.set(len(p.book))


def _recovered(p: RecoveryPorts, claim: ClaimRow) -> None:
    if claim.dispatched or claim.reserved_at is None:
        p.book.fire([claim.task_id], Event.RECOVERED_DISPATCHED)  # may have reached a backend: units stay spent
    else:
        reservation = p.admission.limiter.reservation_at(claim.reserved_at)
        p.book.fire([claim.task_id], Event.RECOVERED_CLAIM, charges=(("global", reservation),))


async def release_left(p: RecoveryPorts, *, every: float = 1.0) -> None:
    """Send again the releases the API did not take (`Book.left`): each such task is
    `in_progress` at the API with its journal row kept, and nobody else would hand it back
    before the stale-claim takeover (RECLAIM_AFTER_SECONDS). Its units were refunded or stay
    spent already: it comes back as dispatched (no refund). With back-off while they fail;
    at shutdown the rows stay for the next start."""
    log = get_logger("daemon").bind(component="recovery")
    failures = 0
    while not p.stopping.is_set():
        with trio.move_on_after(every if failures == 0 else max(every, p.retry.backoff(failures))):
            await p.stopping.wait()
        book = p.book
        ids = sorted(i for i in book.left if book.phase(i) is None)
        book.left.difference_update(ids)
        if p.stopping.is_set() or not ids:
            continue
        try:
            rows = {c.task_id for c in p.journal.orphan_claims()}
            ids = await p.admission.leases.acquire([i for i in ids if i in rows])
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


async def reclaimer(p: RecoveryPorts, *, interval: float, older_than: float) -> None:
    """Every `interval`, hand back in_progress tasks nobody holds (no record, no live lease)."""
    log = get_logger("daemon").bind(component="recovery")
    while not p.stopping.is_set():
        try:
            await reclaim_once(p, older_than=older_than)
        except Exception as exc:  # API or Redis unreachable: try again next round
            log.warning("reclaim_scan_failed", error=str(exc))
        with trio.move_on_after(interval):
            await p.stopping.wait()


async def reclaim_once(p: RecoveryPorts, *, older_than: float) -> int:
    log = get_logger("daemon").bind(component="recovery")
    now = p.wall()
    candidates: list[str] = []
    async with p.api.by_state("in_progress") as entries:
        async for raw in entries:
            if not isinstance(raw, dict):
                continue
            tid = raw.get("_id")
            if not _valid_id(tid) or p.book.phase(tid) is not None:  # type: ignore[arg-type]
                continue
            updated = parse_created_at(raw.get("updatedAt"))
            if updated is None or now - updated >= older_than:
                candidates.append(tid)  # type: ignore[arg-type]
    if not candidates:
        return 0
    live = await p.admission.leases.live(candidates)
    stale = [t for t in candidates if t not in live and p.book.phase(t) is None]
    if not stale:
        return 0
    taken = await p.admission.leases.acquire(stale)
    released = 0
    for tid in taken:
        try:
            await p.api.patch(tid, "pending")
            released += 1
        except ApiError as exc:
            log.warning("reclaim_failed", task_id=tid, error=str(exc))
    await p.admission.leases.release(taken)
    if released:
        p.metrics.released.labels("stale_claim").inc(released)
        log.warning("stale_claims_reclaimed", count=released, older_than=older_than)
    return released
