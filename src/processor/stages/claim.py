"""Claim: (lease) -> rate-limit reservation -> journal row -> PATCH in_progress.

The order is fixed so that a crash always leaves a trail the next start can clean up. Each
step is a lifecycle event (`processor.pure.lifecycle`); the book performs its effects. A
claim the API refused is dropped (units refunded, journal row gone); a claim whose outcome
is unknown (no answer, 5xx) is handed back with PATCH pending, and if that fails too its
journal row stays for the next start.
"""

from __future__ import annotations

from typing import Any

import trio

from processor.effects.api import ApiError
from processor.effects.limiter import LimiterError
from processor.effects.retrying import retrying
from processor.effects.store import StoreError
from processor.kinds.base import Work
from processor.pure import ratelimit as rl
from processor.pure.faults import Fault
from processor.pure.lifecycle import Event
from processor.pure.tasks import Backend
from processor.runtime import Runtime, api_fault, api_retryable
from processor.stages import budget


async def claimer(rt: Runtime, intake: trio.MemoryReceiveChannel[Work], claimed: trio.MemorySendChannel[Work]) -> None:
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
                await rt.book.drop([w.id for w in group])
                continue
            group = await _leave_down_backends(rt, group)
            if not group:
                continue
            admitted = await admit(rt, group, log)
            if not admitted:
                continue
            steps = rt.book.fire([w.id for w in admitted], Event.CLAIM_SENT)
            try:
                await rt.book.perform(steps)
            except StoreError as exc:
                log.error("journal_write_failed", error=str(exc))
                await rt.book.move([w.id for w in admitted], Event.JOURNAL_FAILED)
                await trio.sleep(1.0)
                continue
            for w in admitted:
                patches.start_soon(claim_one, rt, w, claimed.clone())
    log.debug("claimer_done")


async def _leave_down_backends(rt: Runtime, group: list[Work]) -> list[Work]:
    """Tasks for a backend whose breaker refuses calls stay pending (not claimed); a
    half-open backend gets one group, the probe's."""
    keep: list[Work] = []
    down: list[Work] = []
    slot: dict[Backend, bool] = {}
    for w in group:
        guard = rt.board.guards.get(w.backend)
        if guard is not None and w.backend not in slot:
            slot[w.backend] = guard.claim_slot()
        (keep if guard is None or slot[w.backend] else down).append(w)
    if down:
        await rt.book.drop([w.id for w in down])
    return keep


async def admit(rt: Runtime, group: list[Work], log: Any) -> list[Work]:
    """Leases, then the rate limits (global, then OpenAI's own caps). Returns what may go."""
    ids = [w.id for w in group]
    try:
        leased = set(await rt.admission.leases.acquire(ids))
    except Exception as exc:  # leases cannot be taken (Redis down): claim nothing, fail closed
        log.warning("lease_acquire_failed", error=str(exc), action="not claiming; retrying")
        await rt.book.drop(ids)
        rt.admission.pause(2.0)
        return []
    await rt.book.drop([i for i in ids if i not in leased])
    group = [w for w in group if w.id in leased]
    if not group:
        return []
    charges: dict[str, tuple[Any, ...]] = {w.id: () for w in group}
    budgets = budget.budgets_on(rt)
    try:
        # with a token or spend tier on, each task reserves what it may cost at most
        decision = await rt.admission.limiter.admit(budget.demands(rt, group) if budgets else len(group))
    except LimiterError as exc:  # the store cannot count: nothing goes through uncounted
        await _limiter_failed(rt, group, exc, log)
        return []
    group, admitted, refused = await _split(rt, group, decision, charges, log, budgets=budgets)
    retry_at = decision.retry_at - rt.admission.limiter.now() if decision.retry_at is not None else None
    openai = [w for w in admitted if w.backend is Backend.OPENAI]
    if openai:
        try:
            od = await rt.admission.openai_limiter.admit(len(openai))
        except LimiterError as exc:  # the same rule for OpenAI's own caps: claim nothing, retry later
            for w in group:
                rt.book.fire([w.id], Event.RESERVE, charges=charges[w.id])
            await rt.book.move([w.id for w in group], Event.NOT_ADMITTED)
            await _limiter_failed(rt, [], exc, log)
            return []
        for w, r in zip(openai, od.reservations, strict=False):
            if r is not None:  # a refused task was not charged: nothing of it to give back
                charges[w.id] = charges[w.id] + (("openai", r),)
        over = {w.id for w in openai[od.admitted :]}
        if over:
            refused += [w for w in admitted if w.id in over]
            admitted = [w for w in admitted if w.id not in over]
            if od.retry_at is not None:
                rt.admission.pause(od.retry_at - rt.admission.openai_limiter.now())
    for w in group:
        rt.book.fire([w.id], Event.RESERVE, charges=charges[w.id])
    if refused:
        await rt.book.move([w.id for w in refused], Event.NOT_ADMITTED)
        if retry_at is not None:
            if budgets and not decision.exhausted:
                # a token or spend tier has no room: a settlement here lifts the pause, and
                # one of another replica is seen at the next poll
                rt.admission.pause(min(retry_at, rt.s.polling_interval_seconds), budget=True)
            else:
                rt.admission.pause(retry_at)
            log.info("rate_limited", admitted=len(admitted), refused=len(refused), resume_in=round(retry_at, 3))
    return admitted


async def _split(rt: Runtime, group: list[Work], decision: rl.Decision, charges: dict[str, tuple[Any, ...]], log: Any,
                 *, budgets: bool) -> tuple[list[Work], list[Work], list[Work]]:
    """(the tasks still in hand, the admitted, the refused for lack of room) of the global
    decision; each admitted task's reservation goes into `charges`. With budgets, the
    reservations are aligned with the request (None: refused), and tasks refused for no
    price or for being bigger than a whole tier are left pending at once."""
    if not budgets:
        admitted, refused = group[: decision.admitted], group[decision.admitted :]
        for w, r in zip(admitted, decision.reservations, strict=False):
            charges[w.id] = (("global", r),)
        return group, admitted, refused
    admitted = [w for w, r in zip(group, decision.reservations, strict=True) if r is not None]
    refused = [w for w, why in zip(group, decision.refusals, strict=True) if why is rl.Refusal.LIMIT]
    for w, r in zip(group, decision.reservations, strict=True):
        if r is not None:
            charges[w.id] = (("global", r),)
    if len(admitted) + len(refused) < len(group):  # no price, or bigger than a whole tier
        await budget.left_pending(rt, group, decision.refusals, log)
        group = [w for w, why in zip(group, decision.refusals, strict=True) if why is None or why is rl.Refusal.LIMIT]
    return group, admitted, refused


async def _limiter_failed(rt: Runtime, group: list[Work], exc: LimiterError, log: Any) -> None:
    log.error("rate_limit_store_failed", kind=exc.kind.value, error=str(exc))
    if group:
        await rt.book.drop([w.id for w in group])
    rt.admission.pause(5.0)


def _claim_retryable(rt: Runtime) -> Any:
    def on(exc: BaseException) -> bool | float:
        # PATCH in_progress is idempotent: a transient failure that reached the API is retried
        if isinstance(exc, ApiError) and exc.sent and not rt.stopping.is_set():
            verdict = api_retryable(exc)
            if verdict is not False:
                rt.metrics.retries.labels("api", "claim").inc()
            return verdict
        return False
    return on


async def claim_one(rt: Runtime, work: Work, claimed: trio.MemorySendChannel[Work]) -> None:
    async with claimed:
        try:
            async for attempt in retrying(name="claim", on=_claim_retryable(rt), attempts=rt.s.max_retries + 1,
                                          base=0.5, factor=rt.s.retry_backoff_factor, cap=rt.s.retry_max_delay_seconds,
                                          budget=rt.api_budget, rng=rt.rng):
                with attempt:
                    await rt.api.patch(work.id, "in_progress")
        except ApiError as exc:
            await _claim_failed(rt, work, exc)
            return
        if work.id not in rt.book.records:
            return
        await rt.book.move([work.id], Event.CLAIM_OK)
        rt.book.claimed_at[work.id] = trio.current_time()
        rt.admission.claim_failures = 0
        rt.metrics.stage_tasks.labels("claimed").inc()
        if work.created_at is not None:
            rt.metrics.pickup_age.observe(max(0.0, rt.wall() - work.created_at))
        await claimed.send(work)


async def _claim_failed(rt: Runtime, work: Work, exc: ApiError) -> None:
    """If the API may have applied the claim (no answer, or a 5xx), hand it back with
    PATCH pending; if it answered no, just let go. Either way the units go back."""
    fault = api_fault(exc)
    maybe_applied = exc.sent and fault in (Fault.UNREACHABLE, Fault.SERVER, Fault.BUSY, Fault.TIMEOUT, Fault.MALFORMED)
    if maybe_applied:
        await rt.book.release([work.id], "claim_unknown", event=Event.CLAIM_UNKNOWN)
    else:
        await rt.book.move([work.id], Event.CLAIM_REFUSED)
        if fault is Fault.NOT_FOUND:
            rt.book.recent[work.id] = trio.current_time()
    if fault is not Fault.NOT_FOUND:  # e.g. 403 on every claim: back off instead of re-polling at once
        rt.admission.claim_failures += 1
        rt.admission.pause(rt.backoff(rt.admission.claim_failures))
    rt.log.warning("claim_failed", task_id=work.id, status=exc.status, error=str(exc))
