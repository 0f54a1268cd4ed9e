"""Claim: (lease) -> rate-limit reservation -> journal row -> PATCH in_progress.

The order is fixed so that a crash always leaves a trail the next start can clean up. A
claim PATCH that fails, or whose outcome is unknown, refunds the reservation and leaves the
task for a later poll (an unknown outcome is also released with a best-effort PATCH pending).
"""

from __future__ import annotations

import trio

from processor.effects.api import ApiError
from processor.effects.limiter import LimiterError
from processor.effects.store import ClaimRow, StoreError
from processor.pure.ratelimit import Reservation
from processor.pure.retry import ErrorKind
from processor.pure.tasks import Backend, Task
from processor.runtime import Runtime


async def claimer(rt: Runtime, intake: trio.MemoryReceiveChannel[Task], claimed: trio.MemorySendChannel[Task]) -> None:
    log = rt.log.bind(component="claim")
    async with intake, claimed, trio.open_nursery() as patches:
        while True:
            try:
                first = await intake.receive()
            except trio.EndOfChannel:
                break
            group = [first]
            while len(group) < rt.s.max_batch_size:
                try:
                    group.append(intake.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            rt.metrics.channel_depth.labels("intake").set(intake.statistics().current_buffer_used)
            if rt.stopping.is_set():
                for t in group:
                    rt.unhold(t.id, finished=False)
                continue
            group = await _leave_down_backends(rt, group)
            if not group:
                continue
            admitted = await admit(rt, group, log)
            if not admitted:
                continue
            try:
                await rt.journal.add_claims([
                    ClaimRow(t.id, t.text, t.model, t.backend.value, t.created_at, rt.wall(), _reserved_at(rt.held[t.id].reservation))
                    for t in admitted
                ])
            except StoreError as exc:
                log.error("journal_write_failed", error=str(exc))
                await rt.refund([rt.held[t.id] for t in admitted])
                for t in admitted:
                    rt.unhold(t.id, finished=False)
                await trio.sleep(1.0)
                continue
            for t in admitted:
                patches.start_soon(claim_one, rt, t, claimed.clone())
    log.debug("claimer_done")


async def _leave_down_backends(rt: Runtime, group: list[Task]) -> list[Task]:
    """Tasks for a backend whose breaker is open stay pending (not claimed)."""
    keep = []
    for t in group:
        guard = rt.backend_guards.get(t.backend)
        if guard is not None and guard.blocked_until() is not None:
            rt.unhold(t.id, finished=False)
        else:
            keep.append(t)
    return keep


async def admit(rt: Runtime, group: list[Task], log) -> list[Task]:
    """Leases, then the rate limits (global, then OpenAI's own caps). Returns what may go."""
    try:
        leased = set(await rt.leases.acquire([t.id for t in group]))
    except Exception as exc:  # leases cannot be taken (Redis down): claim nothing, fail closed
        log.warning("lease_acquire_failed", error=str(exc), action="not claiming; retrying")
        for t in group:
            rt.unhold(t.id, finished=False)
        rt.admission_paused_until = trio.current_time() + 2.0
        return []
    for t in group:
        if t.id not in leased:
            rt.unhold(t.id, finished=False)
    group = [t for t in group if t.id in leased]
    if not group:
        return []
    try:
        decision = await rt.limiter.admit(len(group))
    except LimiterError as exc:  # the store cannot count: nothing goes through uncounted
        await _limiter_failed(rt, group, exc, log)
        return []
    admitted, refused = group[: decision.admitted], group[decision.admitted :]
    for t, r in zip(admitted, decision.reservations, strict=False):
        rt.held[t.id].reservation = r
    openai = [t for t in admitted if t.backend is Backend.OPENAI]
    if openai:
        try:
            od = await rt.openai_limiter.admit(len(openai))
        except LimiterError as exc:  # the same as the global limiter: claim nothing, retry later
            await rt.refund([rt.held[t.id] for t in admitted])
            await _limiter_failed(rt, group, exc, log)
            return []
        over = openai[od.admitted :]
        for t, r in zip(openai, od.reservations, strict=False):
            rt.held[t.id].openai_reservation = r
        if over:
            await rt.refund([rt.held[t.id] for t in over])
            over_ids = {t.id for t in over}
            refused += over
            admitted = [t for t in admitted if t.id not in over_ids]
            if od.retry_at is not None:
                _pause(rt, od.retry_at - rt.openai_limiter.now())
    if refused:
        await rt.leases.release([t.id for t in refused])
        for t in refused:
            rt.unhold(t.id, finished=False)
        if decision.retry_at is not None:
            resume_in = decision.retry_at - rt.limiter.now()
            _pause(rt, resume_in)
            log.info("rate_limited", admitted=len(admitted), refused=len(refused), resume_in=round(resume_in, 3))
    return admitted


def _reserved_at(r: Reservation | None) -> float | None:
    return None if r is None else r.at


async def _limiter_failed(rt: Runtime, group: list[Task], exc: LimiterError, log) -> None:
    log.error("rate_limit_store_failed", kind=exc.kind.value, error=str(exc))
    await rt.leases.release([t.id for t in group])
    for t in group:
        rt.unhold(t.id, finished=False)
    rt.admission_paused_until = trio.current_time() + 5.0


def _pause(rt: Runtime, seconds: float) -> None:
    rt.admission_paused_until = max(rt.admission_paused_until, trio.current_time() + max(0.0, seconds))


async def claim_one(rt: Runtime, task: Task, claimed: trio.MemorySendChannel[Task]) -> None:
    async with claimed:
        attempt = 0
        while True:
            try:
                await rt.api.patch(task.id, "in_progress")
                break
            except ApiError as exc:
                # PATCH in_progress is idempotent: a transient failure is retried a few times
                if exc.kind is ErrorKind.RETRYABLE and exc.sent and attempt < rt.s.max_retries and not rt.stopping.is_set():
                    rt.metrics.retries.labels("api", "claim").inc()
                    await trio.sleep(rt.backoff(attempt))
                    attempt += 1
                    continue
                await _claim_failed(rt, task, exc)
                return
        held = rt.held.get(task.id)
        if held is None:
            return
        held.claimed = True
        held.claimed_at = trio.current_time()
        rt.claim_failures = 0
        rt.metrics.stage_tasks.labels("claimed").inc()
        if task.created_at is not None:
            rt.metrics.pickup_age.observe(max(0.0, rt.wall() - task.created_at))
        await claimed.send(task)


async def _claim_failed(rt: Runtime, task: Task, exc: ApiError) -> None:
    """Refund, and leave the task for a later poll. If the API may have applied the claim
    (no answer, or a 5xx), hand it back with a best-effort PATCH pending."""
    held = rt.held.get(task.id)
    if held is not None:
        await rt.refund([held])
    maybe_applied = exc.sent and (exc.status is None or exc.status >= 500)
    if maybe_applied:
        try:
            await rt.api.patch(task.id, "pending")
        except ApiError:
            pass  # the journal row stays: start-up recovery or the stale-claim scan releases it
        else:
            await rt.journal.remove_claims([task.id])
    else:
        await rt.journal.remove_claims([task.id])
    await rt.leases.release([task.id])
    rt.unhold(task.id, finished=exc.status == 404)
    if exc.status != 404:  # e.g. 403 on every claim: back off instead of re-polling at once
        rt.claim_failures += 1
        _pause(rt, rt.backoff(rt.claim_failures))
    rt.log.warning("claim_failed", task_id=task.id, status=exc.status, error=str(exc))
