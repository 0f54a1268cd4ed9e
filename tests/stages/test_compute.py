"""The compute stage (`stages/embed.py`): the backend call under its breaker, the answer's
check, and the error policy carried out (split, fail, retry, release, backend or model unusable).

Tasks are claimed through the real claim stage first; the embedding server is a fake that
raises `DependencyError`s with chosen faults.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest
import trio

from processor.board import MODEL_RECHECK
from processor.kinds.base import Work
from processor.pure.breaker import State
from processor.pure.faults import Fault
from processor.pure.lifecycle import Phase
from processor.pure.tasks import Backend
from processor.stages import embed
from tests.stages.conftest import IO_SETTLE, MODEL, World, claim_all, drain, make_world, measure, tid


@pytest.fixture
async def lane() -> AsyncIterator[tuple[trio.MemorySendChannel[list[str]], trio.MemoryReceiveChannel[list[str]]]]:
    send, recv = trio.open_memory_channel[list[str]](1000)
    yield send, recv


async def _run(w: World, works: Sequence[Work], lane) -> list[str]:
    """Claim `works`, compute them as one batch; returns the ids handed to the reporter."""
    claimed = await claim_all(w, works)
    assert len(claimed) == len(works)
    await embed.compute_batch(w.p.stages.embed, list(claimed), lane[0])
    return drain(lane[1])


def _outcome(w: World, n: int):
    rec = w.p.book.records[tid(n)]
    assert rec.phase is Phase.COMPUTED
    return rec.outcome


def _released(w: World) -> set[str]:
    return {p.task_id for p in w.api.sent("pending") if p.answer == "ok"}


async def test_a_good_answer_goes_to_the_outbox_then_the_reporter(world: World, lane, autojump_clock) -> None:
    ids = await _run(world, [world.work(i) for i in range(3)], lane)
    assert ids == [tid(0), tid(1), tid(2)]
    assert all(_outcome(world, i).state == "succeeded" and _outcome(world, i).result == world.embedder.vector("") for i in range(3))
    assert world.outbox_ids() == set(ids)
    assert world.embedder.calls == [["text number 0", "text number 1", "text number 2"]]
    assert world.journal.db.query("SELECT task_id, dispatched FROM journal ORDER BY task_id") == [(i, 1) for i in ids]
    assert world.limiter.refunds == []


async def test_groups_never_exceed_what_the_backend_takes(world: World, lane, autojump_clock) -> None:
    world.embedder.max_items = 2
    ids = await _run(world, [world.work(i) for i in range(5)], lane)
    assert [len(c) for c in world.embedder.calls] == [2, 2, 1]
    assert len(ids) == 5


async def test_input_fault_splits_down_to_the_lone_bad_task_which_alone_fails(world: World, lane, autojump_clock) -> None:
    world.embedder.poison = {"BAD": Fault.INPUT}
    works = [world.work(i) for i in range(8)]
    works[5] = world.work(5, "this one is BAD")
    ids = await _run(world, works, lane)
    assert sorted(ids) == sorted(w.id for w in works)
    assert _outcome(world, 5).state == "failed" and "input" in (_outcome(world, 5).reason or "")
    assert all(_outcome(world, i).state == "succeeded" for i in range(8) if i != 5)
    sizes = [len(c) for c in world.embedder.calls if any("BAD" in t for t in c)]
    assert sizes == [8, 4, 2, 1]  # halves until the bad input is alone
    assert world.p.board.guards[world.backend].state.state is State.CLOSED  # a task's defect never trips it
    assert world.api.sent("pending") == []


async def test_server_fault_splits_and_the_lone_task_is_handed_back_not_failed(world: World, lane, autojump_clock) -> None:
    world.embedder.poison = {"CRASH": Fault.SERVER}
    works = [world.work(0), world.work(1, "makes it CRASH"), world.work(2), world.work(3)]
    ids = await _run(world, works, lane)
    assert sorted(ids) == [tid(0), tid(2), tid(3)]
    assert [len(c) for c in world.embedder.calls if any("CRASH" in t for t in c)] == [4, 2, 1]
    assert _released(world) == {tid(1)}
    assert world.p.book.phase(tid(1)) is None and tid(1) not in world.outbox_ids()
    assert world.journal.attempts([tid(1)]) == {}  # nobody answered meanwhile: not counted


async def test_a_storm_of_5xx_fails_no_task_and_opens_the_breaker(world: World, lane, autojump_clock) -> None:
    world.embedder.poison = {"text": Fault.SERVER}  # every text
    works = [world.work(i) for i in range(8)]
    assert await _run(world, works, lane) == []
    assert _released(world) == {w.id for w in works}
    assert world.p.board.guards[world.backend].is_open
    # split calls do not count against the backend (one input may be the cause); five lone
    # failures (the threshold) open it and the rest go back uncalled: never a storm
    lone = [c for c in world.embedder.calls if len(c) == 1]
    assert len(lone) == 5 and len(world.embedder.calls) < 2 * len(works)
    assert len(world.p.book) == 0 and world.outbox_ids() == set()


async def test_one_poison_input_in_a_big_batch_never_opens_the_breaker(world: World, lane, autojump_clock) -> None:
    """Regression (#11): the split halves that hold a poison input failed one after another,
    opened the breaker, and every other task of the batch went back pending."""
    world.embedder.poison = {"CRASH": Fault.SERVER}
    works = [world.work(0, "makes it CRASH")] + [world.work(i) for i in range(1, 64)]  # first: every left half holds it
    ids = await _run(world, works, lane)
    assert sorted(ids) == sorted(tid(i) for i in range(1, 64))
    assert world.p.board.guards[world.backend].state.state is State.CLOSED
    assert _released(world) == {tid(0)}


async def test_busy_is_retried_and_then_released_never_failed(world: World, lane, autojump_clock) -> None:
    world.embedder.poison = {"text": Fault.BUSY}
    assert await _run(world, [world.work(0), world.work(1)], lane) == []
    assert len(world.embedder.calls) == 1 + world.p.config.max_retries
    assert _released(world) == {tid(0), tid(1)}
    assert world.journal.attempts([tid(0), tid(1)]) == {}
    assert world.p.board.guards[world.backend].state.state is State.CLOSED  # busy never trips it
    assert world.metric("ai_tasks_released_total", reason="backend_unavailable") == 2


async def test_busy_once_then_an_answer_succeeds(world: World, lane, autojump_clock) -> None:
    world.embedder.faults = [Fault.BUSY, Fault.BUSY]
    ids = await _run(world, [world.work(0)], lane)
    assert ids == [tid(0)] and len(world.embedder.calls) == 3 and world.api.sent("pending") == []
    assert world.metric("processor_retries_total", dependency=world.backend.value, reason="busy") == 2


async def test_rate_limited_waits_what_the_server_asked(world: World, lane, autojump_clock) -> None:
    world.embedder.faults = [Fault.RATE_LIMITED]
    world.embedder.retry_after = 12.5
    claimed = await claim_all(world, [world.work(0)])
    t0 = trio.current_time()
    await embed.compute_batch(world.p.stages.embed, claimed, lane[0])
    assert drain(lane[1]) == [tid(0)]
    assert trio.current_time() - t0 >= 12.5  # virtual seconds
    assert world.p.board.guards[world.backend].state.state is State.CLOSED


@pytest.mark.parametrize("fault", [Fault.PARAMETER, Fault.AUTH, Fault.QUOTA])
async def test_a_whole_backend_fault_makes_it_unusable_releases_and_opens_the_breaker(
    world: World, lane, autojump_clock, fault: Fault
) -> None:
    world.embedder.faults = [fault]
    assert await _run(world, [world.work(0), world.work(1)], lane) == []
    assert len(world.embedder.calls) == 1  # no retry, no split: the fix is a setting
    assert _released(world) == {tid(0), tid(1)}
    guard = world.p.board.guards[world.backend]
    assert guard.is_open
    if fault is Fault.QUOTA:
        assert world.backend in world.p.board.quota and world.backend not in world.p.board.down
        assert world.metric("embedding_quota_exhausted", backend=world.backend.value) == 1
    else:
        assert world.backend in world.p.board.down and world.backend not in world.p.board.quota
    assert world.limiter.refunds == []  # they reached the backend: units stay spent
    assert world.outbox_ids() == set() and world.journal_ids() == set()
    # once the breaker lets a probe through and it works, the verdict is cleared
    await trio.sleep(guard.blocked_until() - trio.current_time() + 0.1)  # type: ignore[operator]
    assert await _run(world, [world.work(2)], lane) == [tid(2)]
    assert world.p.board.down == {} and world.p.board.quota == {}
    assert world.metric("embedding_quota_exhausted", backend=world.backend.value) == 0
    assert guard.state.state is State.CLOSED


async def test_vectors_of_another_size_are_the_backends_fault(world: World, lane, autojump_clock) -> None:
    world.embedder.answer_dim = 8  # expected 4
    assert await _run(world, [world.work(0), world.work(1)], lane) == []
    assert _released(world) == {tid(0), tid(1)}
    assert world.p.board.guards[world.backend].is_open
    assert "8-dimensional" in world.p.board.down[world.backend]


async def test_unreachable_after_retries_marks_the_backend_down(world: World, lane, autojump_clock) -> None:
    world.embedder.poison = {"text": Fault.UNREACHABLE}
    assert await _run(world, [world.work(0)], lane) == []
    assert len(world.embedder.calls) == 1 + world.p.config.max_retries
    assert _released(world) == {tid(0)} and world.backend in world.p.board.down
    assert world.p.board.guards[world.backend].is_open


async def test_a_missing_model_releases_its_tasks_and_names_the_model(world: World, lane, autojump_clock) -> None:
    world.embedder.faults = [Fault.MODEL_MISSING]
    assert await _run(world, [world.work(0), world.work(1)], lane) == []
    assert _released(world) == {tid(0), tid(1)}
    assert MODEL in world.p.board.unservable
    assert world.p.board.model_unusable(MODEL) is not None
    assert not world.p.board.guards[world.backend].is_open  # the backend itself is fine
    assert world.metric("ai_tasks_released_total", reason="model_unservable") == 2
    await trio.sleep(MODEL_RECHECK)
    assert world.p.board.model_unusable(MODEL) is None  # tried again after a while


async def test_an_open_breaker_hands_the_batch_back_uncalled(world: World, lane, autojump_clock) -> None:
    claimed = await claim_all(world, [world.work(0)])
    world.p.board.guards[world.backend].force_open()
    await embed.compute_batch(world.p.stages.embed, claimed, lane[0])
    assert world.embedder.calls == [] and _released(world) == {tid(0)}
    assert len(world.limiter.refunded) == 1  # never reached a backend: its unit goes back


async def test_a_text_over_the_backends_input_limit_fails_without_a_call(world: World, lane, autojump_clock) -> None:
    world.embedder.max_input_tokens = 10
    ids = await _run(world, [world.work(0, "short"), world.work(1, "far too long " * 10)], lane)
    assert sorted(ids) == [tid(0), tid(1)]
    assert "too long" in (_outcome(world, 1).reason or "")
    assert world.embedder.calls == [["short"]]


async def test_a_malformed_answer_for_one_task_hands_that_task_back_counted(tmp_path, lane, autojump_clock) -> None:
    w = make_world(tmp_path)
    w.embedder.latency = 0.25  # the answer takes time: the backend answered during this operation
    w.embedder.malformed = {"text number 1"}
    try:
        ids = await _run(w, [w.work(0), w.work(1), w.work(2)], lane)
        assert sorted(ids) == [tid(0), tid(2)]
        assert _released(w) == {tid(1)}
        assert w.journal.attempts([tid(1)]) == {tid(1): 1}
        assert w.journal.attempts([tid(0), tid(2)]) == {}
    finally:
        w.close()


async def _round(w: World, poison: Work, good: Work | None, lane) -> None:
    """One claim + compute of the poison task; `good` (if any) is answered by the same
    backend while the poison call is in flight (held open by an event, with journal work
    meanwhile: the callers' clocks jump only after IO_SETTLE of real idleness)."""
    entered, gate = trio.Event(), trio.Event()

    async def before(texts: Sequence[str]) -> None:
        if any("POISON" in t for t in texts):
            entered.set()
            await gate.wait()

    w.embedder.before = before
    claimed = await claim_all(w, [poison] + ([good] if good else []))
    async with trio.open_nursery() as n:
        n.start_soon(embed.compute_batch, w.p.stages.embed, [claimed[0]], lane[0])
        await entered.wait()
        await trio.sleep(1.0)
        if good is not None:
            await embed.compute_batch(w.p.stages.embed, [claimed[1]], lane[0])
        gate.set()


async def test_retry_later_counts_only_when_the_backend_answered_others_and_fails_past_the_bound(
    tmp_path, lane, autojump_clock
) -> None:
    autojump_clock.autojump_threshold = IO_SETTLE
    w = make_world(tmp_path, MAX_TASK_ATTEMPTS=3)
    w.embedder.poison = {"POISON": Fault.SERVER}
    poison = w.work(99, "a POISON pill")
    try:
        # another request answered while the poison one is out needs two out at once: a
        # backend gets that only once its speed is measured (before: one request at a time)
        assert await measure(w) >= 2
        for k in (1, 2):
            await _round(w, poison, w.work(k), lane)
            assert w.journal.attempts([poison.id]) == {poison.id: k}
            assert w.api.states[poison.id] == "pending" and w.p.book.phase(poison.id) is None
        await _round(w, poison, w.work(3), lane)
        out = w.p.book.records[poison.id].outcome
        assert out is not None and out.state == "failed" and "gave up after 3 attempts" in (out.reason or "")
        assert poison.id in drain(lane[1])
        assert w.journal.attempts([poison.id]) == {}
    finally:
        w.close()


async def test_retry_later_without_other_answers_never_counts_nor_fails(tmp_path, lane, autojump_clock) -> None:
    autojump_clock.autojump_threshold = IO_SETTLE
    w = make_world(tmp_path, MAX_TASK_ATTEMPTS=2)
    w.embedder.poison = {"POISON": Fault.SERVER}
    poison = w.work(99, "a POISON pill")
    try:
        for _ in range(4):
            await _round(w, poison, None, lane)
            assert w.api.states[poison.id] == "pending"
        assert w.journal.attempts([poison.id]) == {}
        assert drain(lane[1]) == []
    finally:
        w.close()


async def test_a_batch_queued_at_shutdown_is_handed_back(world: World, lane, autojump_clock) -> None:
    from processor.pure.batching import Batch

    claimed = await claim_all(world, [world.work(0), world.work(1)])
    bs, br = trio.open_memory_channel(1)
    world.p.stopping.set()
    bs.send_nowait(Batch(("text_embedding", world.backend, MODEL), tuple(claimed), 0.0))
    bs.close()
    await embed.embed_worker(world.p.stages.embed, br, lane[0].clone())
    assert world.embedder.calls == [] and _released(world) == {tid(0), tid(1)}
    assert world.metric("ai_tasks_released_total", reason="shutdown") == 2


async def test_the_batcher_closes_a_batch_when_full_or_after_the_wait(world: World, autojump_clock) -> None:
    world_s = world.p.config
    cs, cr = trio.open_memory_channel[Work](100)
    bs, br = trio.open_memory_channel(100)
    async with trio.open_nursery() as n:
        n.start_soon(embed.batcher, world.p.stages.batch, cr, bs)
        for i in range(world_s.max_batch_size + 1):
            await cs.send(world.work(i))
        first = await br.receive()
        assert len(first.items) == world_s.max_batch_size  # full: closed at once
        t0 = trio.current_time()
        second = await br.receive()
        assert len(second.items) == 1
        assert trio.current_time() - t0 == pytest.approx(world_s.batch_max_wait_ms / 1000.0, abs=1e-6)
        await cs.aclose()


async def test_an_openai_backend_unusable_is_its_own(tmp_path, lane, autojump_clock) -> None:
    w = make_world(tmp_path, backend=Backend.OPENAI)
    w.embedder.faults = [Fault.AUTH]
    try:
        assert await _run(w, [w.work(0)], lane) == []
        assert Backend.OPENAI in w.p.board.down
    finally:
        w.close()


async def test_a_result_whose_lease_was_lost_is_abandoned_not_reported(tmp_path, lane, autojump_clock) -> None:
    from processor.effects.leases import NoLeases

    class Lost(NoLeases):
        def lost(self) -> set[str]:
            return {tid(1)}

    world = make_world(tmp_path, leases=Lost())
    try:
        ids = await _run(world, [world.work(0), world.work(1)], lane)
        assert ids == [tid(0)]
        assert world.p.book.phase(tid(1)) is None and tid(1) not in world.outbox_ids() and tid(1) not in world.journal_ids()
        assert world.p.book.known(tid(1))  # another replica owns it now: not taken again soon
    finally:
        world.close()


async def test_a_missing_ollama_model_falls_back_when_configured(tmp_path, lane, autojump_clock) -> None:
    from tests.stages.conftest import FakeEmbedder

    openai = FakeEmbedder()
    w = make_world(tmp_path, backend=Backend.OLLAMA, extra={Backend.OPENAI: openai},
                   FALLBACK_MODELS='{"nomic-embed-text": "text-embedding-3-small"}')
    w.embedder.faults = [Fault.MODEL_MISSING]
    try:
        ids = await _run(w, [w.work(0), w.work(1)], lane)
        assert sorted(ids) == [tid(0), tid(1)]
        assert openai.calls == [["text number 0", "text number 1"]]
        assert all(_outcome(w, i).state == "succeeded" for i in range(2))
        assert w.api.sent("pending") == [] and w.p.board.unservable == {}
        assert w.metric("embedding_fallbacks_total", model=MODEL, fallback="text-embedding-3-small") == 2
    finally:
        w.close()


async def test_busy_never_counts_an_attempt_even_when_others_were_answered(tmp_path, lane, autojump_clock) -> None:
    w = make_world(tmp_path, MAX_TASK_ATTEMPTS=1)
    w.embedder.poison = {"POISON": Fault.BUSY}
    poison = w.work(99, "a POISON pill")
    try:
        for k in (1, 2, 3):
            await _round(w, poison, w.work(k), lane)
            assert w.api.states[poison.id] == "pending"
        assert w.journal.attempts([poison.id]) == {}
        assert sorted(drain(lane[1])) == [tid(1), tid(2), tid(3)]  # only the good ones were reported
    finally:
        w.close()


async def test_an_outbox_that_cannot_be_written_still_reports_the_results(world: World, lane, autojump_clock) -> None:
    """A store failure while writing results must not end the pipeline (nor lose the work):
    the results go to the reporter without their outbox rows."""
    works = [world.work(i) for i in range(3)]
    claimed = await claim_all(world, works)
    world.journal.db.close()  # the state store is gone (disk, permissions): every write fails
    await embed.compute_batch(world.p.stages.embed, list(claimed), lane[0])
    assert sorted(drain(lane[1])) == sorted(w.id for w in works)
    assert all(world.p.book.phase(w.id) is Phase.COMPUTED for w in works)
    assert world.metric("ai_tasks_rejected_total", reason="outbox_write_failed") == 3
