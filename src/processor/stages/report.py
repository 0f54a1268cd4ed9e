"""Report each outcome with PATCH (succeeded + vector, or failed + reason), then drop its
outbox and journal rows in one transaction per batch."""

from __future__ import annotations

import trio

from processor.runtime import Outcome, Runtime


async def reporter(rt: Runtime, results: trio.MemoryReceiveChannel[list[Outcome]]) -> None:
    slots = trio.Semaphore(max(2, rt.s.concurrency_limit * 2))
    async with results, trio.open_nursery() as n:
        async for outcomes in results:
            await slots.acquire()
            n.start_soon(_report_batch, rt, outcomes, slots)


async def _report_batch(rt: Runtime, outcomes: list[Outcome], slots: trio.Semaphore) -> None:
    try:
        await report_batch(rt, outcomes)
    finally:
        slots.release()


async def report_batch(rt: Runtime, outcomes: list[Outcome]) -> None:
    done: list[Outcome] = []

    async def one(o: Outcome) -> None:
        if await rt.report(o):
            done.append(o)

    async with trio.open_nursery() as n:
        for o in outcomes:
            n.start_soon(one, o)
    if done:
        await rt.finish(done)
        ok = sum(1 for o in done if o.state == "succeeded")
        rt.log.info("batch_reported", component="report", succeeded=ok, failed=len(done) - ok)
        for o in done:
            rt.log.debug("task_reported", component="report", task_id=o.task_id, state=o.state, reason=o.reason)
