"""Start-up recovery and stale-claim takeover (`stages/recovery.py`), over the state a
previous run left in a real SQLite journal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio

from processor.effects.store import ClaimRow, OutboxRow
from processor.pure import ratelimit as rl
from processor.stages import recovery
from tests.stages.conftest import MODEL, WALL0, World, http, tid

VECTOR = [0.0, 1.0, 0.0, 0.0]


def claim_row(n: int | str, *, reserved_at: float | None = WALL0 - 30.0, dispatched: bool = False) -> ClaimRow:
    task_id = tid(n) if isinstance(n, int) else n
    return ClaimRow(task_id, "some text", MODEL, "mock", WALL0 - 100.0, WALL0 - 30.0, reserved_at, dispatched=dispatched)


async def left_behind(w: World, claims: Sequence[ClaimRow] = (), results: Sequence[OutboxRow] = ()) -> None:
    """What a previous run wrote before it died."""
    await w.journal.add_claims([*claims, *(claim_row(r.task_id) for r in results)])
    await w.journal.put_results(list(results))


async def test_outbox_rows_are_reported_first_and_never_released(world: World, autojump_clock) -> None:
    await left_behind(world, results=[OutboxRow(tid(1), "succeeded", VECTOR, None, WALL0 - 5.0),
                                      OutboxRow(tid(2), "failed", None, "text is empty", WALL0 - 4.0)])
    await recovery.recover(world.p.stages.recovery)
    assert sorted((p.task_id, p.state, p.result, p.reason) for p in world.api.patches) == [
        (tid(1), "succeeded", VECTOR, None), (tid(2), "failed", None, "text is empty")]
    assert world.outbox_ids() == set() and world.journal_ids() == set()
    assert len(world.p.book) == 0 and world.limiter.refunds == []


async def test_an_outbox_row_the_api_will_not_take_now_stays_for_the_next_start(world: World, autojump_clock) -> None:
    await left_behind(world, results=[OutboxRow(tid(1), "succeeded", VECTOR, None, WALL0 - 5.0)])
    world.p.stopping.set()  # e.g. a signal during start-up: reports are given up quickly
    world.api.always[(tid(1), "succeeded")] = http(503)
    await recovery.recover(world.p.stages.recovery)
    assert world.outbox_ids() == {tid(1)}
    assert world.api.sent("pending") == []  # a computed result is never handed back


async def test_orphan_claims_are_released_and_refunded_only_if_never_dispatched(world: World, autojump_clock) -> None:
    await left_behind(world, claims=[claim_row(1, reserved_at=WALL0 - 30.0),
                                     claim_row(2, dispatched=True),
                                     claim_row(3, reserved_at=None)])
    await recovery.recover(world.p.stages.recovery)
    assert {p.task_id for p in world.api.sent("pending") if p.answer == "ok"} == {tid(1), tid(2), tid(3)}
    assert world.journal_ids() == set() and len(world.p.book) == 0
    # only the row that never reached a backend gives its unit back, the one charged then
    assert world.limiter.recovered == [WALL0 - 30.0]
    assert world.limiter.refunds == [[rl.Reservation(WALL0 - 30.0, 1, ())]]
    assert world.metric("ai_tasks_released_total", reason="recovered_at_start") == 3


async def test_an_orphan_whose_release_fails_keeps_its_row(world: World, autojump_clock) -> None:
    await left_behind(world, claims=[claim_row(1), claim_row(2)])
    world.api.answer(tid(1), "pending", http(502))
    await recovery.recover(world.p.stages.recovery)
    assert world.journal_ids() == {tid(1)}
    assert len(world.p.book) == 0


async def test_a_release_the_api_did_not_take_is_sent_again_and_refunds_once(world: World, autojump_clock) -> None:
    await left_behind(world, claims=[claim_row(1), claim_row(2)])
    world.api.answer(tid(1), "pending", http(502), http(503))
    await recovery.recover(world.p.stages.recovery)
    assert world.journal_ids() == {tid(1)} and world.p.book.left == {tid(1)}
    taken = trio.Event()
    patch = world.api.patch

    async def watched(task_id: str, state: str, *args: Any, **kw: Any) -> None:
        await patch(task_id, state, *args, **kw)
        if (task_id, state) == (tid(1), "pending"):
            taken.set()

    world.api.patch = watched  # type: ignore[method-assign]
    async with trio.open_nursery() as n:
        n.start_soon(recovery.release_left, world.p.stages.recovery)
        # an event, no deadline: while a SQLite thread works, the autojump clock jumps to
        # the next deadline there is (a guard's too), so only events order this test
        await taken.wait()
        world.p.stopping.set()  # the sweep in hand finishes (its bookkeeping is shielded)
    assert world.journal_ids() == set()
    answers = [p.answer for p in world.api.sent("pending", tid(1))]
    assert answers[-1] == "ok" and len(answers) == 3, answers
    assert len(world.p.book) == 0 and not world.p.book.left
    # each row gave its unit back once, at the start, however often its release was sent
    assert sorted(r.at for r in world.limiter.refunded) == [WALL0 - 30.0, WALL0 - 30.0]
    assert world.metric("ai_tasks_released_total", reason="release_retry") == 1


async def test_a_row_whose_release_failed_refunds_nothing_at_the_next_start(world: World, autojump_clock) -> None:
    await left_behind(world, claims=[claim_row(1)])
    world.api.answer(tid(1), "pending", http(502))
    await recovery.recover(world.p.stages.recovery)  # refunded now; the row stays
    assert world.journal_ids() == {tid(1)}
    world.p.book.left.clear()
    await recovery.recover(world.p.stages.recovery)  # the next start: released, no second refund
    assert world.journal_ids() == set()
    assert [r.at for r in world.limiter.refunded] == [WALL0 - 30.0]


async def test_rows_with_a_bad_id_or_state_are_quarantined(world: World, autojump_clock) -> None:
    await left_behind(world, claims=[claim_row("../../etc/passwd"), claim_row(5)],
                      results=[OutboxRow("NOT-AN-ID", "succeeded", VECTOR, None, WALL0),
                               OutboxRow(tid(6), "exploded", None, None, WALL0),
                               OutboxRow(tid(7), "succeeded", VECTOR, None, WALL0)])
    await recovery.recover(world.p.stages.recovery)
    assert {p.task_id for p in world.api.patches} == {tid(5), tid(7)}
    assert world.outbox_ids() == set() and world.journal_ids() == set()
    assert world.metric("ai_tasks_rejected_total", reason="quarantined_state_row") == 3


async def test_an_unreadable_state_store_does_not_crash_the_start(world: World, autojump_clock) -> None:
    world.journal.db.tx(lambda c: c.execute("DROP TABLE outbox"))
    await recovery.recover(world.p.stages.recovery)
    assert world.api.patches == [] and len(world.p.book) == 0


def listed(n: int, updated: str) -> dict[str, object]:
    return {"_id": tid(n), "state": "in_progress", "updatedAt": updated}


async def test_stale_claims_nobody_holds_are_handed_back(world: World, autojump_clock) -> None:
    old, recent = "2027-01-15T07:00:00Z", "2027-01-15T07:59:50Z"
    world.p.book.take(world.work(3))  # in hand here: never reclaimed
    world.api.in_progress_list = [listed(1, old), listed(2, recent), listed(3, old), {"_id": "bad", "updatedAt": old},
                                  "junk", listed(4, "not a date")]
    released = await recovery.reclaim_once(world.p.stages.recovery, older_than=600.0)
    assert released == 2
    assert sorted(p.task_id for p in world.api.sent("pending")) == [tid(1), tid(4)]
    assert world.metric("ai_tasks_released_total", reason="stale_claim") == 2


async def test_stale_claims_with_a_live_lease_elsewhere_are_left_alone(world: World, autojump_clock) -> None:
    class Leased:
        def __init__(self) -> None:
            self.released: list[str] = []

        async def live(self, ids: Sequence[str]) -> set[str]:
            return {tid(1)}

        async def acquire(self, ids: Sequence[str]) -> list[str]:
            return list(ids)

        async def release(self, ids: Sequence[str]) -> None:
            self.released += ids

    leases = Leased()
    world.p.admission.leases = leases  # type: ignore[assignment]
    world.api.in_progress_list = [listed(1, "2027-01-15T07:00:00Z"), listed(2, "2027-01-15T07:00:00Z")]
    assert await recovery.reclaim_once(world.p.stages.recovery, older_than=600.0) == 1
    assert [p.task_id for p in world.api.patches] == [tid(2)]
    assert leases.released == [tid(2)]


@pytest.mark.parametrize("answer", [http(409), http(500)])
async def test_a_reclaim_the_api_refuses_is_not_counted(world: World, autojump_clock, answer) -> None:
    world.api.in_progress_list = [listed(1, "2027-01-15T07:00:00Z")]
    world.api.answer(tid(1), "pending", answer)
    assert await recovery.reclaim_once(world.p.stages.recovery, older_than=600.0) == 0
    assert world.metric("ai_tasks_released_total", reason="stale_claim") == 0
