"""Report each outcome with PATCH (succeeded + result, or failed + reason); the book then
drops its outbox and journal rows (lifecycle REPORT_OK)."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from processor.pure.lifecycle import Event, Phase
from processor.runtime import Runtime


async def reporter(rt: Runtime, results: trio.MemoryReceiveChannel[list[str]]) -> None:
    slots = trio.Semaphore(max(2, rt.s.concurrency_limit * 2))
    async with results, trio.open_nursery() as n:
        async for ids in results:
            await slots.acquire()
            n.start_soon(_report_batch, rt, ids, slots)


async def _report_batch(rt: Runtime, ids: list[str], slots: trio.Semaphore) -> None:
    try:
        await report_batch(rt, ids)
    finally:
        slots.release()


SETTLE_WAIT = 1.0  # seconds the reports a batch got through wait for its slower ones before they settle


async def report_batch(rt: Runtime, ids: Sequence[str]) -> None:
    done: list[tuple[str, str, str | None]] = []
    taken: list[str] = []  # reports the API took: their rows go in one transaction
    now = trio.current_time()
    wall = rt.wall()
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
        rec = rt.book.records.get(task_id)
        if rec is None or rec.outcome is None:
            return
        work = rt.book.works.get(task_id)
        claimed_at = rt.book.claimed_at.get(task_id)
        o = await rt.report(task_id, settle=False)  # what the API took (a refused result: `failed` with why)
        if o is not None:
            rec_now = rt.book.records.get(task_id)
            if rec_now is not None and rec_now.phase is Phase.COMPUTED:
                taken.append(task_id)
            if claimed_at is not None:
                rt.metrics.task_duration.observe(now - claimed_at)
            if work is not None and work.created_at is not None:
                rt.metrics.e2e_latency.observe(max(0.0, wall - work.created_at))
            kind = work.type if work is not None else "text_embedding"
            rt.metrics.tasks_processed.labels(kind, o.state).inc()
            done.append((task_id, o.state, o.reason))

    try:
        async with trio.open_nursery() as n:
            for i in ids:
                n.start_soon(one, i)
            while ids and not all_in.is_set():
                with trio.move_on_after(SETTLE_WAIT):
                    await all_in.wait()
                if not all_in.is_set():  # one report the API keeps failing must not hold the others
                    await _settle(rt, taken)
    finally:
        await _settle(rt, taken)
    if done:
        await rt.finished([d[0] for d in done])
        ok = sum(1 for d in done if d[1] == "succeeded")
        rt.log.info("batch_reported", component="report", succeeded=ok, failed=len(done) - ok)
        for tid, state, reason in done:
            rt.log.debug("task_reported", component="report", task_id=tid, state=state, reason=reason)


async def _settle(rt: Runtime, taken: list[str]) -> None:
    """REPORT_OK for the reports taken so far, in one journal transaction (shielded)."""
    if taken:
        batch = taken[:]
        del taken[:]
        with trio.CancelScope(shield=True):
            await rt.book.move(batch, Event.REPORT_OK)
