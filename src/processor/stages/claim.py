"""Claim: (lease) -> rate-limit reservation -> journal row -> PATCH in_progress.

The order is fixed so that a crash always leaves a trail the next start can clean up. Each
step is a lifecycle event (`processor.pure.lifecycle`); the book performs its effects. A
claim the API refused is dropped (units refunded, journal row gone); a claim whose outcome
is unknown (no answer, 5xx) is handed back with PATCH pending, and if that fails too its
journal row stays for the next start.

The stage's port is `ClaimPorts`: the book, the admission (leases, limiters, pause), the
backends' guards, the task API with its retry budget, the budget stage's port, metrics,
the retry schedule, the wall clock and the lifecycle's `stopping`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from processor.board import Admission
from processor.book import Book
from processor.effects.api import ApiError, TaskApi
from processor.effects.guard import Guard
from processor.effects.limiter import LimiterError
from processor.effects.logs import get_logger
from processor.effects.metrics import Metrics
from processor.effects.retrying import Budget, retrying
from processor.effects.store import StoreError
from processor.kinds.base import Work
from processor.pure import ratelimit as rl
from processor.pure.faults import Fault
from processor.pure.lifecycle import Event
from processor.pure.tasks import Backend
from processor.runtime import RetryConfig, api_fault, api_retryable
from processor.stages import budget


@attrs.frozen
class ClaimPorts:
    """What the claim stage touches."""

    book: Book
    admission: Admission
    guards: Mapping[Backend, Guard]  # the backends' breakers: a refusing backend's tasks stay pending
    api: TaskApi
    budgets: budget.Budgets
    metrics: Metrics
    retry: RetryConfig
    stopping: trio.Event
    wall: Callable[[], float]
    max_batch_size: int = 64
    polling_interval_seconds: float = 30.0  # the longest a budget pause lasts
    api_budget: Budget = attrs.field(factory=Budget)  # the claim PATCHes' retry budget


async def claimer(p: ClaimPorts, intake: trio.MemoryReceiveChannel[Work], claimed: trio.MemorySendChannel[Work]) -> None:
    log = get_logger("daemon").bind(component="claim")
    async with intake, claimed, trio.open_nursery() as patches:
        while True:
            try:
                first = await intake.receive()
            except trio.EndOfChannel:
                break
            group = [first]
            while len(group) < p.max_batch_size:
                try:
                    group.append(intake.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            p.metrics.channel_depth.labels("intake").set(intake.statistics().current_buffer_used)
            if p.stopping.is_set():
                await p.book.drop([w.id for w in group])
                continue
            group = await _leave_down_backends(p, group)
            if not group:
                continue
            admitted = await admit(p, group, log)
            if not admitted:
                continue
            steps = p.book.fire([w.id for w in admitted], Event.CLAIM_SENT)
            try:
                await p.book.perform(steps)
            except StoreError as exc:
                log.error("journal_write_failed", error=str(exc))
                await p.book.move([w.id for w in admitted], Event.JOURNAL_FAILED)
                await trio.sleep(1.0)
                continue
            for w in admitted:
                patches.start_soon(claim_one, p, w, claimed.clone())
    log.debug("claimer_done")


async def _leave_down_backends(p: ClaimPorts, group: list[Work]) -> list[Work]:
    """Tasks for a backend whose breaker refuses calls stay pending (not claimed); a
    half-open backend gets one group, the probe's."""
    keep: list[Work] = []
    down: list[Work] = []
    slot: dict[Backend, bool] = {}
    for w in group:
        guard = p.guards.get(w.backend)
        if guard is not None and w.backend not in slot:
            slot[w.backend] = guard.claim_slot()
        (keep if guard is None or slot[w.backend] else down).append(w)
    if down:
        await p.book.drop([w.id for w in down])
    return keep


async def admit(p: ClaimPorts, group: list[Work], log: Any) -> list[Work]:
    """Leases, then the rate limits (global, then OpenAI's own caps). Returns what may go."""
    ids = [w.id for w in group]
    try:
        leased = set(await p.admission.leases.acquire(ids))
    except Exception as exc:  # leases cannot be taken (Redis down): claim nothing, fail closed
        log.warning("lease_acquire_failed", error=str(exc), action="not claiming; retrying")
        await p.book.drop(ids)
        p.admission.pause(2.0)
        return []
    await p.book.drop([i for i in ids if i not in leased])
    group = [w for w in group if w.id in leased]
    if not group:
        return []
    charges: dict[str, tuple[Any, ...]] = {w.id: () for w in group}
    budgets = budget.budgets_on(p.budgets)
    try:
        # with a token or spend tier on, each task reserves what it may cost at most
        decision = await p.admission.limiter.admit(budget.demands(p.budgets, group) if budgets else len(group))
    except LimiterError as exc:  # the store cannot count: nothing goes through uncounted
        await _limiter_failed(p, group, exc, log)
        return []
    group, admitted, refused = await _split(p, group, decision, charges, log, budgets=budgets)
    retry_at = decision.retry_at - p.admission.limiter.now() if decision.retry_at is not None else None
    openai = [w for w in admitted if w.backend is Backend.OPENAI]
    if openai:
        try:
            od = await p.admission.openai_limiter.admit(len(openai))
        except LimiterError as exc:  # the same rule for OpenAI's own caps: claim nothing, retry later
            for w in group:
                p.book.fire([w.id], Event.RESERVE, charges=charges[w.id])
            await p.book.move([w.id for w in group], Event.NOT_ADMITTED)
            await _limiter_failed(p, [], exc, log)
            return []
        for w, r in zip(openai, od.reservations, strict=False):
            if r is not None:  # a refused task was not charged: nothing of it to give back
                charges[w.id] = charges[w.id] + (("openai", r),)
        over = {w.id for w in openai[od.admitted :]}
        if over:
            refused += [w for w in admitted if w.id in over]
            admitted = [w for w in admitted if w.id not in over]
            if od.retry_at is not None:
                p.admission.pause(od.retry_at - p.admission.openai_limiter.now())
    for w in group:
        p.book.fire([w.id], Event.RESERVE, charges=charges[w.id])
    if refused:
        await p.book.move([w.id for w in refused], Event.NOT_ADMITTED)
        if retry_at is not None:
            if budgets and not decision.exhausted:
                # a token or spend tier has no room: a settlement here lifts the pause, and
                # one of another replica is seen at the next poll
                p.admission.pause(min(retry_at, p.polling_interval_seconds), budget=True)
            else:
                p.admission.pause(retry_at)
            log.info("rate_limited", admitted=len(admitted), refused=len(refused), resume_in=round(retry_at, 3))
    return admitted


async def _split(p: ClaimPorts, group: list[Work], decision: rl.Decision, charges: dict[str, tuple[Any, ...]], log: Any,
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
        await budget.left_pending(p.budgets, group, decision.refusals, log)
        group = [w for w, why in zip(group, decision.refusals, strict=True) if why is None or why is rl.Refusal.LIMIT]
    return group, admitted, refused


async def _limiter_failed(p: ClaimPorts, group: list[Work], exc: LimiterError, log: Any) -> None:
    log.error("rate_limit_store_failed", kind=exc.kind.value, error=str(exc))
    if group:
        await p.book.drop([w.id for w in group])
    p.admission.pause(5.0)


def _claim_retryable(p: ClaimPorts) -> Any:
    def on(exc: BaseException) -> bool | float:
        # PATCH in_progress is idempotent: a transient failure that reached the API is retried
        if isinstance(exc, ApiError) and exc.sent and not p.stopping.is_set():
            verdict = api_retryable(exc)
            if verdict is not False:
                p.metrics.retries.labels("api", "claim").inc()
            return verdict
        return False
    return on


async def claim_one(p: ClaimPorts, work: Work, claimed: trio.MemorySendChannel[Work]) -> None:
    async with claimed:
        try:
            async for attempt in retrying(name="claim", on=_claim_retryable(p), attempts=p.retry.max_retries + 1,
                                          base=0.5, factor=p.retry.factor, cap=p.retry.cap,
                                          budget=p.api_budget, rng=p.retry.rng):
                with attempt:
                    await p.api.patch(work.id, "in_progress")
        except ApiError as exc:
            await _claim_failed(p, work, exc)
            return
        if work.id not in p.book.records:
            return
        await p.book.move([work.id], Event.CLAIM_OK)
        p.book.claimed_at[work.id] = trio.current_time()
        p.admission.claim_failures = 0
        p.metrics.stage_tasks.labels("claimed").inc()
        if work.created_at is not None:
            p.metrics.pickup_age.observe(max(0.0, p.wall() - work.created_at))
        await claimed.send(work)


async def _claim_failed(p: ClaimPorts, work: Work, exc: ApiError) -> None:
    """If the API may have applied the claim (no answer, or a 5xx), hand it back with
    PATCH pending; if it answered no, just let go. Either way the units go back."""
    fault = api_fault(exc)
    maybe_applied = exc.sent and fault in (Fault.UNREACHABLE, Fault.SERVER, Fault.BUSY, Fault.TIMEOUT, Fault.MALFORMED)
    if maybe_applied:
        await p.book.release([work.id], "claim_unknown", event=Event.CLAIM_UNKNOWN)
    else:
        await p.book.move([work.id], Event.CLAIM_REFUSED)
        if fault is Fault.NOT_FOUND:
            p.book.recent[work.id] = trio.current_time()
    if fault is not Fault.NOT_FOUND:  # e.g. 403 on every claim: back off instead of re-polling at once
        p.admission.claim_failures += 1
        p.admission.pause(p.retry.backoff(p.admission.claim_failures))
    get_logger("daemon").warning("claim_failed", task_id=work.id, status=exc.status, error=str(exc))
