"""Report each outcome with PATCH (succeeded + result, or failed + reason); the book then
drops its outbox and journal rows (lifecycle REPORT_OK).

The stage's port is the `Reporter`: the book, the task API, the leases (a result whose
lease was lost is abandoned, not reported), metrics, the retry schedule, the wall clock and
the lifecycle's `stopping`. The other stages hand it their outcomes with `deliver` (the
outbox first, then the reporter's channel)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

import attrs
import trio

from processor.book import Book
from processor.effects.api import ApiError, TaskApi
from processor.effects.leases import Leases
from processor.effects.logs import get_logger
from processor.effects.metrics import Metrics
from processor.effects.retrying import retrying
from processor.effects.store import StoreError
from processor.pure.faults import Fault
from processor.pure.lifecycle import Event, Outcome, Phase
from processor.runtime import RetryConfig, api_fault, api_retryable

Deliver = Callable[[Mapping[str, Outcome]], Awaitable[list[str]]]  # `Reporter.deliver`, for the other stages


@attrs.frozen
class Reporter:
    """What the report stage touches; it owns the reporting of a task's final state."""

    book: Book
    api: TaskApi
    leases: Leases
    metrics: Metrics
    retry: RetryConfig
    stopping: trio.Event
    wall: Callable[[], float]
    concurrency: int = 5  # CONCURRENCY_LIMIT: the reporter runs twice as many batches at once

    async def report(self, task_id: str, *, settle: bool = True) -> Outcome | None:
        """PATCH the task's final state until the API takes it. Returns the outcome the story
        ended with (what the API took, the last one it refused, or the one of a task gone);
        None when given up at shutdown (the outbox keeps the result for the next start) or
        when there was nothing to report. `settle=False`: the caller fires REPORT_OK for a
        taken report itself (one journal transaction for a whole batch)."""
        log = get_logger("daemon")
        last: Outcome | None = None
        while True:
            rec = self.book.records.get(task_id)
            if rec is None or rec.outcome is None:
                return last
            o = last = rec.outcome
            try:
                await self._patch_final(task_id, o)
            except ApiError as exc:
                fault = api_fault(exc)
                refused = fault in (Fault.REFUSED, Fault.NOT_FOUND, Fault.INPUT) and (exc.sent or fault is Fault.INPUT)
                if not refused:
                    return None  # given up at shutdown: the outbox keeps the result
                if fault is Fault.NOT_FOUND:
                    log.warning("report_task_gone", task_id=task_id, error=str(exc))
                    await self.book.move([task_id], Event.REPORT_OK)
                    return o
                log.error("report_rejected", task_id=task_id, status=exc.status, state=o.state, error=str(exc))
                self.metrics.rejected.labels(f"report_{exc.status}").inc()
                await self.book.move([task_id], Event.REPORT_REFUSED, why=f"{exc.status}: {exc}"[:300])
                continue  # a refused success is reported `failed` with why; a refused failure ends it
            if settle:
                await self.book.move([task_id], Event.REPORT_OK)
            return o

    async def _patch_final(self, task_id: str, o: Outcome) -> None:
        attempts = 1_000_000 if not self.stopping.is_set() else 3
        async for attempt in retrying(name="report", on=self._report_retryable, attempts=attempts, base=0.5,
                                      factor=self.retry.factor, cap=self.retry.cap, budget=None, rng=self.retry.rng):
            with attempt:
                if attempt.number > 1:
                    await self.api.guard.wait_until_allowed()
                if o.state == "succeeded":
                    await self.api.patch(task_id, "succeeded", o.result, include_result=True)
                else:
                    await self.api.patch(task_id, "failed", None, include_result=True, reason=o.reason)

    def _report_retryable(self, exc: BaseException) -> bool | float:
        # a 403 on a report is a permission to fix, not a refused result: the outbox waits
        verdict = True if isinstance(exc, ApiError) and exc.sent and api_fault(exc) is Fault.AUTH else api_retryable(exc)
        if verdict is False:
            return False
        if self.stopping.is_set() and isinstance(exc, ApiError) and not exc.sent:
            return False
        self.metrics.retries.labels("api", "report").inc()
        return verdict

    async def deliver(self, outcomes: Mapping[str, Outcome]) -> list[str]:
        """Results first go to the outbox (one transaction), then to the reporter. Tasks whose
        lease was lost are abandoned instead. Returns the ids to report."""
        lost = self.leases.lost() & set(outcomes)
        if lost:
            await self.book.abandon(sorted(lost))
        keep = {i: o for i, o in outcomes.items() if i not in lost and i in self.book.records}
        if not keep:
            return []
        computed = sum(1 for i in keep if self.book.phase(i) in (Phase.CLAIMED, Phase.DISPATCHED))
        steps = self.book.fire_each(keep, Event.COMPUTED)
        try:
            await self.book.perform(steps)
        except StoreError as exc:
            # the outbox cannot be written: the results are reported all the same (losing a
            # computed result, or ending the pipeline, would be worse than a crash before the
            # report sends it again); the store's failure shows in /ready
            get_logger("daemon").error("outbox_write_failed", error=str(exc), count=len(keep),
                                       action="reporting without the outbox")
            self.metrics.rejected.labels("outbox_write_failed").inc(len(keep))
        if computed:
            self.metrics.stage_tasks.labels("computed").inc(computed)
        return list(keep)

    async def finished(self, task_ids: Sequence[str]) -> None:
        """Metrics for reports the API took."""
        self.metrics.stage_tasks.labels("reported").inc(len(task_ids))


async def reporter(rep: Reporter, results: trio.MemoryReceiveChannel[list[str]]) -> None:
    slots = trio.Semaphore(max(2, rep.concurrency * 2))
    async with results, trio.open_nursery() as n:
        async for ids in results:
            await slots.acquire()
            n.start_soon(_report_batch, rep, ids, slots)


async def _report_batch(rep: Reporter, ids: list[str], slots: trio.Semaphore) -> None:
    try:
        await report_batch(rep, ids)
    finally:
        slots.release()


SETTLE_WAIT = 1.0  # seconds the reports a batch got through wait for its slower ones before they settle


async def report_batch(rep: Reporter, ids: Sequence[str]) -> None:
    done: list[tuple[str, str, str | None]] = []
    taken: list[str] = []  # reports the API took: their rows go in one transaction
    now = trio.current_time()
    wall = rep.wall()
    left = len(ids)
    all_in = trio.Event()

    async def one(task_id: str) -> None:
        nonlocal left
        try:
            await _one(task_id)
        finally:
            left -= 1
            if left == 0:
                all_in.set()

    async def _one(task_id: str) -> None:
        rec = rep.book.records.get(task_id)
        if rec is None or rec.outcome is None:
            return
        work = rep.book.works.get(task_id)
        claimed_at = rep.book.claimed_at.get(task_id)
        o = await rep.report(task_id, settle=False)  # what the API took (a refused result: `failed` with why)
        if o is not None:
            rec_now = rep.book.records.get(task_id)
            if rec_now is not None and rec_now.phase is Phase.COMPUTED:
                taken.append(task_id)
            if claimed_at is not None:
                rep.metrics.task_duration.observe(now - claimed_at)
            if work is not None and work.created_at is not None:
                rep.metrics.e2e_latency.observe(max(0.0, wall - work.created_at))
            kind = work.type if work is not None else "text_embedding"
            rep.metrics.tasks_processed.labels(kind, o.state).inc()
            done.append((task_id, o.state, o.reason))

    try:
        async with trio.open_nursery() as n:
            for i in ids:
                n.start_soon(one, i)
            while ids and not all_in.is_set():
                with trio.move_on_after(SETTLE_WAIT):
                    await all_in.wait()
                if not all_in.is_set():  # one report the API keeps failing must not hold the others
                    await _settle(rep.book, taken)
    finally:
        await _settle(rep.book, taken)
    if done:
        await rep.finished([d[0] for d in done])
        ok = sum(1 for d in done if d[1] == "succeeded")
        log = get_logger("daemon")
        log.info("batch_reported", component="report", succeeded=ok, failed=len(done) - ok)
        for tid, state, reason in done:
            log.debug("task_reported", component="report", task_id=tid, state=state, reason=reason)


async def _settle(book: Book, taken: list[str]) -> None:
    """REPORT_OK for the reports taken so far, in one journal transaction (shielded)."""
    if taken:
        batch = taken[:]
        del taken[:]
        with trio.CancelScope(shield=True):
            await book.move(batch, Event.REPORT_OK)
