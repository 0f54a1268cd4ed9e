"""The claim stage (`stages/claim.py`): lease -> reservation -> journal row -> PATCH in_progress.

Driven through `claim.claimer` (and `claim.admit`) with a real book and journal; the task
API, the limiters and the leases are fakes of the outside world.
"""

from __future__ import annotations

import attrs
import pytest
import trio

from processor.effects.limiter import LimiterError
from processor.effects.logs import get_logger
from processor.pure.breaker import Outcome as BreakerOutcome
from processor.pure.faults import Fault
from processor.pure.lifecycle import Phase
from processor.pure.tasks import Backend
from processor.stages import claim
from tests.stages.conftest import World, claim_all, http, make_world, never_sent, no_answer, tid


def _phase(w: World, n: int) -> Phase | None:
    return w.p.book.phase(tid(n))


async def test_claim_ok_writes_the_journal_row_then_patches_in_progress(world: World, autojump_clock) -> None:
    works = [world.work(i) for i in range(3)]
    out = await claim_all(world, works)
    assert [x.id for x in out] == [tid(0), tid(1), tid(2)]
    assert {tid(i): "in_progress" for i in range(3)} == world.api.states
    assert all(_phase(world, i) is Phase.CLAIMED for i in range(3))
    # the journal row carries the instant the global limiter charged (for a refund after a crash)
    rows = {r.task_id: r for r in world.journal.orphan_claims()}
    assert set(rows) == {tid(i) for i in range(3)}
    assert sorted(r.reserved_at for r in rows.values()) == sorted(r.at for r in world.limiter.reserved)
    assert not any(r.dispatched for r in rows.values())
    assert world.limiter.refunds == []
    assert world.metric("processor_stage_tasks_total", stage="claimed") == 3
    assert set(world.p.book.claimed_at) == {tid(i) for i in range(3)}


@pytest.mark.parametrize("status", [400, 403, 409, 422])
async def test_claim_refused_is_dropped_refunded_and_its_journal_row_deleted(world: World, autojump_clock, status: int) -> None:
    world.api.answer(tid(1), "in_progress", http(status, "no"))
    out = await claim_all(world, [world.work(0), world.work(1)])
    assert [x.id for x in out] == [tid(0)]
    assert _phase(world, 1) is None and not world.p.book.known(tid(1))
    assert world.limiter.refunded == [world.limiter.reserved[1]]  # exactly the refused task's unit
    assert world.journal_ids() == {tid(0)}
    assert world.api.sent("pending") == []  # it answered no: nothing to hand back
    assert len(world.api.sent("in_progress", tid(1))) == 1  # a 4xx is never retried
    assert world.p.admission.claim_failures == 1 and world.p.admission.paused  # back off, do not re-poll at once


async def test_claim_of_a_task_gone_404_refunds_and_remembers_the_id_without_backing_off(world: World, autojump_clock) -> None:
    world.api.answer(tid(0), "in_progress", http(404))
    assert await claim_all(world, [world.work(0)]) == []
    assert len(world.limiter.refunded) == 1
    assert world.p.book.known(tid(0))  # a stale pending list may still show it: not taken again
    assert world.p.admission.claim_failures == 0 and not world.p.admission.paused
    assert world.journal_ids() == set()


async def test_claim_with_no_answer_is_handed_back_with_patch_pending_and_refunded(world: World, autojump_clock) -> None:
    attempts = world.p.config.max_retries + 1
    world.api.answer(tid(0), "in_progress", *[no_answer()] * attempts)
    out = await claim_all(world, [world.work(0), world.work(1)])
    assert [x.id for x in out] == [tid(1)]
    assert len(world.api.sent("in_progress", tid(0))) == attempts  # retried (idempotent), then given up
    assert [p.answer for p in world.api.sent("pending", tid(0))] == ["ok"]
    assert world.api.states[tid(0)] == "pending"
    assert len(world.limiter.refunded) == 1 and world.limiter.refunded[0] in world.limiter.reserved
    # the claim that got no answer may still be applied after the release (the API carries
    # out a request whose client left): its journal row stays, the next start hands it back
    assert _phase(world, 0) is None and world.journal_ids() == {tid(0), tid(1)}
    assert world.metric("ai_tasks_released_total", reason="claim_unknown") == 1


async def test_claim_unknown_whose_release_fails_too_keeps_its_journal_row(world: World, autojump_clock) -> None:
    world.api.answer(tid(0), "in_progress", *[http(502)] * (world.p.config.max_retries + 1))
    world.api.answer(tid(0), "pending", http(502))
    assert await claim_all(world, [world.work(0)]) == []
    assert _phase(world, 0) is None  # LEFT: this process is done with it
    assert world.journal_ids() == {tid(0)}  # ...the next start releases it
    assert len(world.limiter.refunded) == 1  # it never reached a backend


async def test_a_transient_claim_failure_is_retried(world: World, autojump_clock) -> None:
    world.api.answer(tid(0), "in_progress", http(503), http(500))
    out = await claim_all(world, [world.work(0)])
    assert [x.id for x in out] == [tid(0)]
    assert [p.answer for p in world.api.sent("in_progress")][-1] == "ok"
    assert len(world.api.sent("in_progress")) == 3
    assert world.limiter.refunds == [] and world.p.admission.claim_failures == 0
    assert world.metric("processor_retries_total", dependency="api", reason="claim") == 2


async def test_a_claim_that_never_left_is_dropped_without_patch_pending(world: World, autojump_clock) -> None:
    world.api.answer(tid(0), "in_progress", never_sent())
    assert await claim_all(world, [world.work(0)]) == []
    assert world.api.sent("pending") == []
    assert len(world.limiter.refunded) == 1 and world.journal_ids() == set()


async def test_journal_write_failure_refunds_everything_and_patches_nothing(world: World, autojump_clock) -> None:
    world.journal.db.tx(lambda c: c.execute(
        "CREATE TRIGGER disk_full BEFORE INSERT ON journal BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"))
    assert await claim_all(world, [world.work(i) for i in range(3)]) == []
    assert world.api.patches == []  # no claim without its trail
    assert sorted(r.at for r in world.limiter.refunded) == sorted(r.at for r in world.limiter.reserved)
    assert len(world.limiter.reserved) == 3
    assert len(world.p.book) == 0


async def test_partial_admission_claims_what_fits_and_pauses_until_capacity_frees(world: World, autojump_clock) -> None:
    world.limiter.room = 2
    world.limiter.retry_in = 7.0
    out = await claim_all(world, [world.work(i) for i in range(5)])
    assert [x.id for x in out] == [tid(0), tid(1)]
    assert {p.task_id for p in world.api.patches} == {tid(0), tid(1)}
    assert len(world.p.book) == 2  # the other three are dropped (left pending, never charged)
    assert world.limiter.refunds == []
    assert world.p.admission.paused_until == pytest.approx(trio.current_time() + 7.0, abs=0.01)


async def test_a_limiter_error_claims_nothing_and_pauses(world: World, autojump_clock) -> None:
    world.limiter.fail = LimiterError(Fault.UNREACHABLE, "store unreachable")
    assert await claim_all(world, [world.work(i) for i in range(3)]) == []
    assert world.api.patches == [] and len(world.p.book) == 0 and world.journal_ids() == set()
    assert world.p.admission.paused_until >= trio.current_time() + 4.9


async def test_leases_that_cannot_be_taken_claim_nothing(world: World, autojump_clock) -> None:
    class Down:
        async def acquire(self, ids: object) -> list[str]:
            raise ConnectionError("redis down")

        async def release(self, ids: object) -> None:
            raise ConnectionError("redis down")

    world.p.admission.leases = Down()  # type: ignore[assignment]
    assert await claim_all(world, [world.work(0)]) == []
    assert world.limiter.admits == [] and world.api.patches == [] and world.p.admission.paused


async def test_a_limiter_error_gives_back_the_leases_just_taken(world: World, autojump_clock) -> None:
    """Leases are taken before the rate limit is asked; when the limiter's store fails, they
    go back. Kept, they were renewed forever (a set growing with every such failure) and no
    replica could ever claim those tasks (a lease is taken with SET NX)."""
    class Held:
        def __init__(self) -> None:
            self.owned: set[str] = set()

        async def acquire(self, ids: list[str]) -> list[str]:
            self.owned.update(ids)
            return list(ids)

        async def release(self, ids: list[str]) -> None:
            self.owned.difference_update(ids)

    leases = Held()
    world.p.admission.leases = leases  # type: ignore[assignment]
    world.p.book.ports = attrs.evolve(world.p.book.ports, leases=leases)
    world.limiter.fail = LimiterError(Fault.UNREACHABLE, "redis restarting")
    for round_ in range(20):
        assert await claim_all(world, [world.work(10 * round_ + i) for i in range(3)]) == []
        assert leases.owned == set()  # nothing held for tasks this replica let go of
    world.limiter.fail = None
    assert [x.id for x in await claim_all(world, [world.work(0)])] == [tid(0)]  # claimable again
    assert leases.owned == {tid(0)}


async def test_leases_held_elsewhere_are_not_claimed(world: World, autojump_clock) -> None:
    class Half:
        async def acquire(self, ids: list[str]) -> list[str]:
            return ids[::2]

        async def release(self, ids: object) -> None:
            return None

    world.p.admission.leases = Half()  # type: ignore[assignment]
    out = await claim_all(world, [world.work(i) for i in range(4)])
    assert [x.id for x in out] == [tid(0), tid(2)]
    assert world.limiter.admits == [2]


@pytest.fixture
async def openai_world(tmp_path):
    w = make_world(tmp_path, backend=Backend.OPENAI)
    yield w
    w.close()


async def test_openai_limiter_error_refunds_the_global_units(openai_world: World, autojump_clock) -> None:
    w = openai_world
    w.openai_limiter.fail = LimiterError(Fault.SERVER, "disk full")
    assert await claim_all(w, [w.work(i) for i in range(3)]) == []
    assert sorted(r.at for r in w.limiter.refunded) == sorted(r.at for r in w.limiter.reserved)
    assert w.api.patches == [] and w.p.admission.paused


async def test_openai_caps_partial_refunds_the_global_units_of_the_refused_only(openai_world: World, autojump_clock) -> None:
    w = openai_world
    w.openai_limiter.room = 1
    out = await claim_all(w, [w.work(i) for i in range(3)])
    assert [x.id for x in out] == [tid(0)]
    assert len(w.limiter.refunded) == 2  # the two the OpenAI caps refused
    # a refused task was never charged by the OpenAI limiter: nothing of it goes back there
    assert all(r is not None for r in w.openai_limiter.refunded)
    assert w.openai_limiter.refunded == []
    assert w.p.admission.paused


async def test_a_backend_whose_breaker_is_open_gets_no_claims(world: World, autojump_clock) -> None:
    guard = world.p.board.guards[world.backend]
    guard.force_open()
    assert await claim_all(world, [world.work(0), world.work(1)]) == []
    assert world.limiter.admits == [] and len(world.p.book) == 0
    await trio.sleep(guard.blocked_until() - trio.current_time() + 0.1)  # type: ignore[operator]
    out = await claim_all(world, [world.work(2), world.work(3)])
    assert [x.id for x in out] == [tid(2), tid(3)]  # half-open: one group, the probe's
    guard.record(BreakerOutcome.FAILURE)  # the probe failed: open again
    assert await claim_all(world, [world.work(4)]) == []


async def test_while_stopping_nothing_is_claimed(world: World, autojump_clock) -> None:
    world.p.stopping.set()
    assert await claim_all(world, [world.work(0)]) == []
    assert world.limiter.admits == [] and world.api.patches == [] and len(world.p.book) == 0


async def test_admit_is_the_lease_and_limit_step_alone(world: World, autojump_clock) -> None:
    works = [world.work(i) for i in range(3)]
    for x in works:
        world.p.book.take(x)
    world.limiter.room = 1
    admitted = await claim.admit(world.p.stages.claim, works, get_logger("daemon"))
    assert [x.id for x in admitted] == [tid(0)]
    assert world.p.book.phase(tid(0)) is Phase.RESERVED
    assert world.p.book.records[tid(0)].charges == (("global", world.limiter.reserved[0]),)
    assert world.p.book.phase(tid(1)) is None and world.p.book.phase(tid(2)) is None
