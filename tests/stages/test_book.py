"""The book of tasks in hand (`processor/book.py`): lifecycle events fired, their
bookkeeping effects carried out against a real SQLite journal, the limiters and the API."""

from __future__ import annotations

import pytest
import trio

from processor.book import RECENT_TTL
from processor.effects.limiter import LimiterError
from processor.effects.store import StoreError
from processor.pure import ratelimit as rl
from processor.pure.faults import Fault
from processor.pure.lifecycle import Event, IllegalTransition, Outcome, Phase
from tests.stages.conftest import MODEL, WALL0, World, http, tid


def _charges(at: float, openai: bool = False) -> tuple:
    c: tuple = (("global", rl.Reservation(at, 1, ())),)
    return c + ((("openai", rl.Reservation(at + 0.5, 1, ())),) if openai else ())


async def _claimed(w: World, *ns: int) -> list[str]:
    """Tasks moved to CLAIMED through the book alone (charges, journal row, claim answered)."""
    ids = []
    for n in ns:
        w.p.book.take(w.work(n))
        w.p.book.fire([tid(n)], Event.RESERVE, charges=_charges(WALL0 + n))
        ids.append(tid(n))
    await w.p.book.perform(w.p.book.fire(ids, Event.CLAIM_SENT))
    await w.p.book.move(ids, Event.CLAIM_OK)
    return ids


async def test_take_known_room_and_phases(world: World, autojump_clock) -> None:
    book = world.p.book
    assert book.room_left() == world.p.config.intake_capacity and not book.known(tid(1))
    book.take(world.work(1))
    book.take_id(tid(2))
    assert len(book) == 2 and book.known(tid(1)) and book.known(tid(2))
    assert book.room_left() == world.p.config.intake_capacity - 2
    assert book.in_phase(Phase.SEEN) == [tid(1), tid(2)]
    assert world.metric("ai_tasks_in_flight") == 2


async def test_an_illegal_event_raises_and_changes_nothing(world: World, autojump_clock) -> None:
    book = world.p.book
    book.take(world.work(1))
    with pytest.raises(IllegalTransition):
        book.fire([tid(1)], Event.CLAIM_OK)
    assert book.phase(tid(1)) is Phase.SEEN
    assert book.fire([tid(9)], Event.CLAIM_OK) == []  # an id it does not hold: nothing happens


async def test_the_journal_row_records_the_task_and_the_global_charge(world: World, autojump_clock) -> None:
    await _claimed(world, 1)
    [row] = world.journal.orphan_claims()
    assert (row.task_id, row.text, row.model, row.backend, row.type) == (tid(1), "text number 1", MODEL, "mock", "text_embedding")
    assert row.reserved_at == WALL0 + 1 and row.claimed_at == WALL0 and row.created_at == WALL0 - 60.0
    assert not row.dispatched
    await world.p.book.move([tid(1)], Event.DISPATCH)
    assert world.journal.orphan_claims()[0].dispatched  # persisted before the backend call


async def test_refunds_are_batched_per_limiter(world: World, autojump_clock) -> None:
    book = world.p.book
    for n in range(3):
        book.take(world.work(n))
        book.fire([tid(n)], Event.RESERVE, charges=_charges(WALL0 + n, openai=True))
    await book.move([tid(n) for n in range(3)], Event.NOT_ADMITTED)
    assert world.limiter.refunds == [[rl.Reservation(WALL0 + n, 1, ()) for n in range(3)]]
    assert world.openai_limiter.refunds == [[rl.Reservation(WALL0 + n + 0.5, 1, ()) for n in range(3)]]
    assert len(book) == 0


async def test_a_refund_that_fails_only_makes_the_limiter_stricter(world: World, autojump_clock) -> None:
    world.limiter.fail_refund = LimiterError(Fault.UNREACHABLE, "redis down")
    ids = await _claimed(world, 1)
    await world.p.book.release(ids, "shutdown")
    assert world.api.states[tid(1)] == "pending" and world.journal_ids() == set()
    assert len(world.limiter.refunds) == 1  # tried once, not raised


async def test_a_write_to_the_outbox_that_fails_is_raised(world: World, autojump_clock) -> None:
    ids = await _claimed(world, 1)
    world.journal.db.tx(lambda c: c.execute(
        "CREATE TRIGGER disk_full BEFORE INSERT ON outbox BEGIN SELECT RAISE(ABORT, 'disk full'); END"))
    with pytest.raises(StoreError):
        await world.p.book.perform(world.p.book.fire_each({ids[0]: Outcome.success([1.0])}, Event.COMPUTED))
    assert world.outbox_ids() == set()  # nothing is reported unstored


async def test_release_hands_back_and_deletes_the_row_or_keeps_it_when_the_api_does_not_answer(world: World, autojump_clock) -> None:
    ids = await _claimed(world, 1, 2)
    world.api.answer(tid(2), "pending", http(500))
    assert await world.p.book.release(ids, "backend_down") == 1
    assert world.journal_ids() == {tid(2)}  # LEFT: the next start releases it
    assert len(world.p.book) == 0
    assert len(world.limiter.refunded) == 2  # never dispatched: both units back
    assert world.metric("ai_tasks_released_total", reason="backend_down") == 1


async def test_release_refunds_nothing_once_dispatched(world: World, autojump_clock) -> None:
    ids = await _claimed(world, 1)
    await world.p.book.move(ids, Event.DISPATCH)
    assert await world.p.book.release(ids, "backend_down") == 1
    assert world.limiter.refunds == []


async def test_release_skips_tasks_with_a_result(world: World, autojump_clock) -> None:
    ids = await _claimed(world, 1, 2)
    await world.p.book.perform(world.p.book.fire_each({tid(1): Outcome.success([1.0])}, Event.COMPUTED))
    assert await world.p.book.release(ids, "shutdown") == 1
    assert world.p.book.phase(tid(1)) is Phase.COMPUTED and world.outbox_ids() == {tid(1)}
    assert [p.task_id for p in world.api.sent("pending")] == [tid(2)]


async def test_a_release_cancelled_mid_patch_keeps_the_row_and_forgets_the_task(world: World, autojump_clock) -> None:
    ids = await _claimed(world, 1, 2)
    world.api.hold[(tid(2), "pending")] = trio.Event()  # never answered
    with trio.move_on_after(5.0):
        await world.p.book.release(ids, "shutdown")
    assert len(world.p.book) == 0
    assert world.journal_ids() == {tid(2)}  # bookkeeping ran shielded: tid(1) released, tid(2) left


async def test_abandon_forgets_without_reporting_and_remembers_the_id(world: World, autojump_clock) -> None:
    ids = await _claimed(world, 1)
    await world.p.book.perform(world.p.book.fire_each({ids[0]: Outcome.success([1.0])}, Event.COMPUTED))
    await world.p.book.abandon(ids)
    assert len(world.p.book) == 0 and world.outbox_ids() == set() and world.journal_ids() == set()
    assert world.p.book.known(ids[0])
    assert world.api.sent("succeeded") == [] and world.api.sent("pending") == []
    assert world.metric("ai_tasks_released_total", reason="lease_lost") == 1
    await trio.sleep(RECENT_TTL)
    assert not world.p.book.known(ids[0])


async def test_drop_lets_go_only_of_tasks_never_claimed(world: World, autojump_clock) -> None:
    ids = await _claimed(world, 1)
    world.p.book.take(world.work(2))
    await world.p.book.drop([ids[0], tid(2)])
    assert world.p.book.phase(tid(1)) is Phase.CLAIMED and world.p.book.phase(tid(2)) is None
    assert not world.p.book.known(tid(2))  # dropped: it may be taken again


async def test_outbox_age_uses_the_wall_clock_of_each_result(world: World, autojump_clock) -> None:
    ids = await _claimed(world, 1, 2)
    await world.p.book.perform(world.p.book.fire_each({ids[0]: Outcome.success([1.0])}, Event.COMPUTED))
    await trio.sleep(10.0)
    await world.p.book.perform(world.p.book.fire_each({ids[1]: Outcome.failure("x")}, Event.COMPUTED))
    await trio.sleep(5.0)
    assert world.p.book.outbox_size == 2
    assert world.p.book.oldest_result_age() == pytest.approx(15.0, abs=0.01)
    await world.p.book.move([ids[0]], Event.REPORT_OK)
    assert world.p.book.oldest_result_age() == pytest.approx(5.0, abs=0.01)


async def test_wait_for_room_returns_once_the_book_is_half_empty(tmp_path, autojump_clock) -> None:
    from tests.stages.conftest import make_world

    w = make_world(tmp_path, INTAKE_CAPACITY=4)
    try:
        ids = await _claimed(w, 1, 2, 3)
        done = trio.Event()

        async def waiter() -> None:
            await w.p.book.wait_for_room(w.p.stopping)
            done.set()

        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await trio.sleep(30.0)
            assert not done.is_set()  # 3 of 4 held: above half, the poller waits
            await w.p.book.release(ids[:1], "test")  # 2 of 4: half
            with trio.fail_after(2.0):
                await done.wait()
        assert len(w.p.book) == 2
        # stopping ends the wait whatever is held
        w.p.book.take(w.work(4))
        w.p.stopping.set()
        with trio.fail_after(2.0):
            await w.p.book.wait_for_room(w.p.stopping)
    finally:
        w.close()


async def test_finished_ids_are_remembered_for_recent_ttl_only(world: World, autojump_clock) -> None:
    """The ids of finished tasks are kept RECENT_TTL seconds, not until RECENT_MAX of them
    piled up: a long run at a steady rate keeps the last RECENT_TTL seconds' worth (a count)."""
    book = world.p.book
    for n in range(600):  # one task reported every second, five times RECENT_TTL
        ids = await _claimed(world, n)
        await book.perform(book.fire_each({ids[0]: Outcome.success([1.0])}, Event.COMPUTED))
        await book.move(ids, Event.REPORT_OK)
        await trio.sleep(1.0)
        assert len(book.recent) <= RECENT_TTL + 1
    assert len(book) == 0 and book.known(tid(599)) and not book.known(tid(0))
