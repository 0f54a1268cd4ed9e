"""The report stage (`stages/report.py`, `Reporter.report`): PATCH succeeded/failed until the
API takes it; a refused result is reported failed with why, once; the outbox is kept when
shutdown gives up."""

from __future__ import annotations

import pytest
import trio

from processor.pure.lifecycle import Outcome, Phase
from processor.stages import report
from tests.stages.conftest import World, claim_all, http, never_sent, no_answer

VECTOR = [0.6, 0.8, 0.0, 0.0]


async def _computed(w: World, *outcomes: Outcome) -> list[str]:
    """Claim one task per outcome and store the outcomes (outbox), as the compute stage does."""
    works = [w.work(i) for i in range(len(outcomes))]
    await claim_all(w, works)
    ids = await w.p.stages.report.deliver({x.id: o for x, o in zip(works, outcomes, strict=True)})
    assert w.outbox_ids() == set(ids)
    return ids


def _processed(w: World, state: str) -> float:
    return w.metric("ai_tasks_processed_total", task_type="text_embedding", status=state)


async def test_a_result_taken_by_the_api_ends_the_story(world: World, autojump_clock) -> None:
    ids = await _computed(world, Outcome.success(VECTOR), Outcome.failure("empty text"))
    await report.report_batch(world.p.stages.report, ids)
    ok, bad = world.api.sent(task_id=ids[0]), world.api.sent(task_id=ids[1])
    assert [(p.state, p.result) for p in ok if p.state != "in_progress"] == [("succeeded", VECTOR)]
    assert [(p.state, p.reason) for p in bad if p.state != "in_progress"] == [("failed", "empty text")]
    assert world.outbox_ids() == set() and world.journal_ids() == set()
    assert len(world.p.book) == 0 and all(world.p.book.known(i) for i in ids)
    assert _processed(world, "succeeded") == 1 and _processed(world, "failed") == 1
    assert world.metric("processor_stage_tasks_total", stage="reported") == 2


async def test_a_task_gone_404_is_done(world: World, autojump_clock) -> None:
    [i] = await _computed(world, Outcome.success(VECTOR))
    world.api.answer(i, "succeeded", http(404))
    assert await world.p.stages.report.report(i) is not None
    assert len(world.api.sent("succeeded")) == 1
    assert world.outbox_ids() == set() and world.p.book.phase(i) is None


async def test_a_refused_result_is_reported_failed_with_why_once(world: World, autojump_clock) -> None:
    [i] = await _computed(world, Outcome.success(VECTOR))
    world.api.answer(i, "succeeded", http(400, "result must have 1024 floats"))
    await report.report_batch(world.p.stages.report, [i])
    [failed] = world.api.sent("failed")
    assert failed.answer == "ok" and "the platform refused the result" in (failed.reason or "")
    assert "1024 floats" in (failed.reason or "")
    assert len(world.api.sent("succeeded")) == 1
    assert world.api.states[i] == "failed"
    assert world.outbox_ids() == set() and world.journal_ids() == set()
    # counted as what the API took: a failure, not a success
    assert _processed(world, "failed") == 1 and _processed(world, "succeeded") == 0


async def test_a_second_refusal_ends_it(world: World, autojump_clock) -> None:
    [i] = await _computed(world, Outcome.success(VECTOR))
    world.api.answer(i, "succeeded", http(400))
    world.api.answer(i, "failed", http(400))
    ended = await world.p.stages.report.report(i)
    assert ended is not None and ended.state == "failed" and "refused the result: 400" in (ended.reason or "")
    assert [p.state for p in world.api.patches if p.state != "in_progress"] == ["succeeded", "failed"]
    assert world.p.book.phase(i) is None and world.outbox_ids() == set() and world.journal_ids() == set()


async def test_a_refused_failure_ends_it_at_once(world: World, autojump_clock) -> None:
    [i] = await _computed(world, Outcome.failure("text is empty"))
    world.api.answer(i, "failed", http(400))
    assert await world.p.stages.report.report(i) is not None
    assert len(world.api.sent("failed")) == 1 and world.outbox_ids() == set()


@pytest.mark.parametrize("error", [http(500), http(503), http(429), no_answer(), never_sent(), http(403), http(401)])
async def test_transient_errors_are_retried_until_taken(world: World, autojump_clock, error) -> None:
    [i] = await _computed(world, Outcome.success(VECTOR))
    world.api.answer(i, "succeeded", error, error, error)
    assert await world.p.stages.report.report(i) is not None
    assert [p.answer == "ok" for p in world.api.sent("succeeded")] == [False, False, False, True]
    assert world.outbox_ids() == set() and world.p.book.phase(i) is None


async def test_a_report_waits_for_the_api_breaker(world: World, autojump_clock) -> None:
    [i] = await _computed(world, Outcome.success(VECTOR))
    world.api.guard.force_open()
    world.api.answer(i, "succeeded", never_sent())
    until = world.api.guard.blocked_until()
    assert until is not None
    assert await world.p.stages.report.report(i) is not None
    assert trio.current_time() >= until  # the retry waited until the breaker let calls through


async def test_shutdown_gives_up_and_keeps_the_outbox(world: World, autojump_clock) -> None:
    [i] = await _computed(world, Outcome.success(VECTOR))
    world.p.stopping.set()
    world.api.always[(i, "succeeded")] = http(502)
    assert await world.p.stages.report.report(i) is None
    assert len(world.api.sent("succeeded")) == 3  # a few tries, bounded
    assert world.outbox_ids() == {i} and world.journal_ids() == {i}  # the next start reports it
    assert world.p.book.phase(i) is Phase.COMPUTED
    await report.report_batch(world.p.stages.report, [i])
    assert _processed(world, "succeeded") == 0


async def test_shutdown_does_not_wait_for_a_request_that_cannot_leave(world: World, autojump_clock) -> None:
    [i] = await _computed(world, Outcome.success(VECTOR))
    world.p.stopping.set()
    world.api.always[(i, "succeeded")] = never_sent()
    t0 = trio.current_time()
    assert await world.p.stages.report.report(i) is None
    assert len(world.api.sent("succeeded")) == 1 and trio.current_time() == t0
    assert world.outbox_ids() == {i}


async def test_the_reporter_reports_every_batch_it_is_given(world: World, autojump_clock) -> None:
    ids = await _computed(world, *[Outcome.success(VECTOR)] * 6)
    world.api.answer(ids[2], "succeeded", http(500))
    send, recv = trio.open_memory_channel[list[str]](10)
    async with send:
        await send.send(ids[:3])
        await send.send(ids[3:])
    await report.reporter(world.p.stages.report, recv)
    assert {p.task_id for p in world.api.sent("succeeded") if p.answer == "ok"} == set(ids)
    assert world.outbox_ids() == set() and _processed(world, "succeeded") == 6


async def test_a_report_the_api_does_not_answer_does_not_hold_the_others_of_its_batch(world: World, autojump_clock) -> None:
    ids = await _computed(world, *[Outcome.success(VECTOR)] * 3)
    world.api.hold[(ids[1], "succeeded")] = trio.Event()  # this one PATCH hangs (never answered)
    async with trio.open_nursery() as n:
        n.start_soon(report.report_batch, world.p.stages.report, ids)
        await trio.sleep(report.SETTLE_WAIT + 0.5)  # virtual; the settling write runs on a thread:
        for _ in range(1_000_000):  # wait for it without moving the clock
            if len(world.p.book) == 1:
                break
            await trio.lowlevel.checkpoint()
        # the two the API took are done: rows gone, out of the book (their room is free)
        assert set(world.p.book.records) == {ids[1]}
        assert world.outbox_ids() == {ids[1]} and world.journal_ids() == {ids[1]}
        n.cancel_scope.cancel()
    assert world.outbox_ids() == {ids[1]}  # the one not taken stays for later
