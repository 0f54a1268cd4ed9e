"""The intake stage (`stages/intake.py`): one streamed read of the pending list, parsed
entry by entry, taking tasks only while there is room."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from processor.board import MODEL_RECHECK
from processor.book import RECENT_TTL
from processor.kinds.base import Work
from processor.pure.lifecycle import Event, Outcome, Phase
from processor.pure.tasks import Backend, Routing
from processor.stages import intake
from tests.stages.conftest import MODEL, WALL0, World, drain, http, make_world, tid


def entry(n: int, text: str = "", *, model: str | None = MODEL, type_: str = "text_embedding") -> dict[str, Any]:
    content: dict[str, Any] = {"text": text or f"text number {n}"}
    if model is not None:
        content["model"] = model
    return {"_id": tid(n), "type": type_, "content": content, "state": "pending", "createdAt": "2027-01-15T08:00:00Z"}


class Lanes:
    def __init__(self) -> None:
        self.intake_s, self.intake_r = trio.open_memory_channel[Work](1000)
        self.rejects_s, self.rejects_r = trio.open_memory_channel[list[str]](1000)
        self.logged: set[object] = set()

    async def poll(self, w: World) -> tuple[int, int]:
        return await intake.poll_once(w.p.stages.intake, self.intake_s, self.rejects_s, self.logged)

    def taken(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.intake_r.receive_nowait().id)
            except trio.WouldBlock:
                return out


@pytest.fixture
def lanes() -> Lanes:
    return Lanes()


async def test_valid_tasks_are_taken_with_their_routing(world: World, lanes: Lanes, autojump_clock) -> None:
    world.api.pending_list = [entry(0), entry(1, model=None)]
    assert await lanes.poll(world) == (2, 2)
    assert lanes.taken() == [tid(0), tid(1)]
    work = world.p.book.works[tid(1)]
    assert (work.model, work.backend, work.text) == (MODEL, Backend.MOCK, "text number 1")  # default model
    assert work.created_at is not None
    assert world.p.book.phase(tid(0)) is Phase.SEEN
    assert world.api.patches == []  # intake never PATCHes a valid task
    assert world.metric("processor_stage_tasks_total", stage="taken") == 2


@pytest.mark.parametrize(("content", "reason"), [
    ({"text": "   "}, "empty_text"),
    ({"text": 42}, "invalid_content"),
    (None, "missing_content"),
    ({"text": "x" * 10_001}, "text_too_long"),
    ({"text": "ok", "model": ""}, "invalid_model"),
])
async def test_a_defect_is_reported_failed_with_its_reason(world: World, lanes: Lanes, autojump_clock, content, reason) -> None:
    world.api.pending_list = [{"_id": tid(7), "type": "text_embedding", "content": content}, entry(8)]
    assert await lanes.poll(world) == (1, 2)
    assert lanes.taken() == [tid(8)]
    assert drain(lanes.rejects_r) == [tid(7)]  # straight to the reporter
    rec = world.p.book.records[tid(7)]
    assert rec.phase is Phase.COMPUTED and rec.outcome is not None and rec.outcome.state == "failed"
    assert rec.outcome.reason
    assert world.outbox_ids() == {tid(7)}  # stored before it is reported
    assert world.metric("ai_tasks_rejected_total", reason=reason) == 1
    # listed again before the report went out: not reported twice
    assert await lanes.poll(world) == (0, 2)
    assert drain(lanes.rejects_r) == []


async def test_an_entry_without_a_usable_id_is_counted_once_and_never_reported(world: World, lanes: Lanes, autojump_clock) -> None:
    world.api.pending_list = [{"_id": "not-hex", "type": "text_embedding", "content": "x"}, [1, 2], entry(1)]
    await lanes.poll(world)
    await lanes.poll(world)
    assert world.metric("ai_tasks_rejected_total", reason="invalid_id") == 1
    assert world.metric("ai_tasks_rejected_total", reason="not_an_object") == 1
    assert drain(lanes.rejects_r) == [] and world.api.patches == []
    assert lanes.taken() == [tid(1)]


async def test_an_unknown_type_is_left_pending_and_counted_once(world: World, lanes: Lanes, autojump_clock) -> None:
    world.api.pending_list = [entry(0, type_="translate"), entry(1)]
    await lanes.poll(world)
    await lanes.poll(world)
    assert lanes.taken() == [tid(1)]
    assert world.p.book.phase(tid(0)) is None and world.api.patches == []
    assert world.metric("ai_tasks_skipped_total", task_type="translate") == 1


async def test_a_model_this_deployment_does_not_serve_is_left_pending_and_named(tmp_path, lanes: Lanes, autojump_clock) -> None:
    w = make_world(tmp_path, backend=Backend.OLLAMA, routing=Routing(default_model=MODEL, local_models=frozenset({MODEL})))
    try:
        w.api.pending_list = [entry(0, model="text-embedding-3-large"), entry(1)]
        assert await lanes.poll(w) == (1, 2)
        assert lanes.taken() == [tid(1)]
        assert w.p.book.phase(tid(0)) is None and drain(lanes.rejects_r) == [] and w.api.patches == []
        assert "text-embedding-3-large" in w.p.board.unservable
        assert w.metric("ai_tasks_skipped_total", task_type="unservable_model") == 1
    finally:
        w.close()


async def test_a_model_found_unservable_is_left_pending_until_it_is_tried_again(world: World, lanes: Lanes, autojump_clock) -> None:
    world.p.board.mark_unservable(MODEL, "model not pulled")  # what the compute stage does on MODEL_MISSING
    world.api.pending_list = [entry(0)]
    assert await lanes.poll(world) == (0, 1)
    assert world.p.book.phase(tid(0)) is None and world.api.patches == []
    await trio.sleep(MODEL_RECHECK)
    assert await lanes.poll(world) == (1, 1)
    assert lanes.taken() == [tid(0)]


async def test_no_more_than_the_room_left_is_taken_and_reading_stops(tmp_path, lanes: Lanes, autojump_clock) -> None:
    w = make_world(tmp_path, INTAKE_CAPACITY=4)
    try:
        w.p.book.take(w.work(100))  # one held already
        w.api.pending_list = [entry(i) for i in range(50)]
        new, read = await lanes.poll(w)
        assert new == 3 and len(w.p.book) == 4 and w.p.book.room_left() == 0
        assert read == w.api.pending_reads == 4  # stopped at the first task with no room for it
        assert await lanes.poll(w) == (0, 4)  # the three in hand are passed over, the next one has no room
        assert w.api.pending_reads == 8
    finally:
        w.close()


async def test_ids_in_hand_or_just_reported_are_not_taken_again(world: World, lanes: Lanes, autojump_clock) -> None:
    world.api.pending_list = [entry(0), entry(1)]
    await lanes.poll(world)
    assert lanes.taken() == [tid(0), tid(1)]
    assert await lanes.poll(world) == (0, 2)  # a stale list still shows both: in hand
    # tid(0) is reported: remembered for a while (a stale pending list may still list it)
    world.p.book.fire([tid(0)], Event.COMPUTED,
                       outcome=Outcome.success([1.0]))
    await world.p.book.move([tid(0)], Event.REPORT_OK)
    assert world.p.book.phase(tid(0)) is None
    assert await lanes.poll(world) == (0, 2)
    await trio.sleep(RECENT_TTL)
    assert await lanes.poll(world) == (1, 2)
    assert lanes.taken() == [tid(0)]


async def test_nothing_is_taken_while_stopping(world: World, lanes: Lanes, autojump_clock) -> None:
    world.p.stopping.set()
    world.api.pending_list = [entry(0)]
    assert await lanes.poll(world) == (0, 1)
    assert len(world.p.book) == 0


async def test_the_poller_backs_off_after_a_failed_poll_then_takes_the_tasks(world: World, lanes: Lanes, autojump_clock) -> None:
    world.api.pending_errors = [http(502), http(502)]
    world.api.pending_list = [entry(0)]
    async with trio.open_nursery() as n:
        n.start_soon(intake.poller, world.p.stages.intake, lanes.intake_s, lanes.rejects_s)
        work = await lanes.intake_r.receive()
        assert work.id == tid(0)
        assert world.api.polls >= 3 and world.api.pending_errors == []
        assert trio.current_time() >= 0.1  # two back-offs of at least 50 ms each (virtual time)
        taken_at = trio.current_time()
        await trio.sleep(0.01)
        world.p.stopping.set()
    assert world.metric("ai_tasks_last_successful_poll_timestamp_seconds") == pytest.approx(WALL0 + taken_at)
    # the poller closed its channels on the way out
    with pytest.raises(trio.EndOfChannel):
        await lanes.intake_r.receive()


async def test_the_poller_does_not_poll_while_admission_is_paused(world: World, lanes: Lanes, autojump_clock) -> None:
    world.api.pending_list = [entry(0)]
    world.p.admission.pause(30.0)
    async with trio.open_nursery() as n:
        n.start_soon(intake.poller, world.p.stages.intake, lanes.intake_s, lanes.rejects_s)
        await trio.sleep(29.0)
        assert world.api.polls == 0
        work = await lanes.intake_r.receive()
        assert work.id == tid(0) and trio.current_time() >= 30.0
        world.p.stopping.set()


@pytest.mark.parametrize("which", ["api", "backends"])
async def test_the_poller_waits_while_polling_would_be_pointless(world: World, lanes: Lanes, autojump_clock, which: str) -> None:
    world.api.pending_list = [entry(0)]
    guard = world.api.guard if which == "api" else world.p.board.guards[world.backend]
    guard.force_open()
    until = guard.blocked_until()
    assert until is not None
    async with trio.open_nursery() as n:
        n.start_soon(intake.poller, world.p.stages.intake, lanes.intake_s, lanes.rejects_s)
        await trio.sleep(until - trio.current_time() - 0.01)
        assert world.api.polls == 0  # the API breaker is open, or no backend would take the work
        work = await lanes.intake_r.receive()
        assert work.id == tid(0) and trio.current_time() >= until
        world.p.stopping.set()
