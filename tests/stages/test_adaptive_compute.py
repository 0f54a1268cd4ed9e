"""The compute stage sizes embedding requests by the backend's measured speed (issue 11).

A backend's speed is unknown at start: the stage sends one small request at a time until
it has measured it, then cuts batches into requests of about the limiter's target time,
with timeouts from what it measured (`processor.pure.adaptive`, `processor.effects.adaptive`).
The fake embedding server answers a request in `per_char * characters` seconds of the
virtual clock, one request at a time (`serial`), like a CPU server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest
import trio

from processor.pure import adaptive as ad
from processor.pure.lifecycle import Phase
from processor.stages import embed
from tests.stages.conftest import IO_SETTLE, MODEL, World, claim_all, drain, make_world, tid

TEXT = 2000  # characters per text: one second each on the slow server
SLOW = 1 / 2000  # seconds per character: 1 s per 2,000-character text


@pytest.fixture
async def slow(tmp_path) -> AsyncIterator[World]:
    """The daemon's defaults (a cold backend gets a request of 2 texts), a slow CPU server."""
    w = make_world(tmp_path, cold_items=None)
    w.embedder.per_char = SLOW
    w.embedder.serial = True
    yield w
    w.close()


def _texts(w: World, n: int, first: int = 0) -> list:
    return [w.work(first + i, f"{first + i:05d} " + "x" * (TEXT - 6)) for i in range(n)]


def _limiter(w: World):
    assert w.p.board.adaptive is not None
    return w.p.board.adaptive.get(w.backend, MODEL)


async def _compute(w: World, works: Sequence, lane: trio.MemorySendChannel[list[str]]) -> None:
    claimed = await claim_all(w, works)
    assert len(claimed) == len(works)
    await embed.compute_batch(w.p.stages.embed, claimed, lane)


async def test_a_slow_backend_gets_small_requests_first_then_requests_sized_to_its_speed(slow: World, autojump_clock) -> None:
    send, recv = trio.open_memory_channel[list[str]](1000)
    works = _texts(slow, 64)
    await _compute(slow, works, send)
    assert sorted(drain(recv)) == sorted(w.id for w in works)  # every one computed
    sizes = [len(c) for c in slow.embedder.calls]
    assert sum(sizes) == 64  # each text sent once: nothing timed out, nothing re-sent
    assert sizes[0] == 2  # speed unknown: one small request
    assert sizes[:3] == sorted(sizes[:3]) and sizes[1] > sizes[0]  # then larger, from what was proven
    # measured at 1 s per text: requests of about the 10 s target, never the 64 of MAX_BATCH_SIZE
    assert all(5 <= n <= 15 for n in sizes[3:-1]), sizes
    lim = _limiter(slow)
    assert lim.state.timeouts == 0 and lim.plan().measured
    # the first request had the configured timeout; later ones one from the measured speed,
    # well above their expected time (3 x expected + 5 s) and below the configured one
    cap = _limiter(slow).cfg.timeout_cap  # OPENAI_TIMEOUT (the mock backend's)
    assert slow.embedder.timeouts[0] == cap
    for n, t in list(zip(sizes, slow.embedder.timeouts, strict=True))[3:]:
        assert t is not None and n * 1.0 < t < cap
    assert slow.embedder.most_out == 1


async def test_a_cold_backend_gets_one_request_at_a_time_until_measured(slow: World, autojump_clock) -> None:
    send, recv = trio.open_memory_channel[list[str]](1000)
    first_answer: list[int] = []  # calls made before the first answer came

    async def before(texts: Sequence[str]) -> None:
        if not first_answer:
            first_answer.append(len(slow.embedder.calls))

    slow.embedder.before = before
    batches = [_texts(slow, 8, first=100 * k) for k in range(3)]
    claimed = [await claim_all(slow, b) for b in batches]
    async with trio.open_nursery() as n:  # three embed workers with a batch each
        for b in claimed:
            n.start_soon(embed.compute_batch, slow.p.stages.embed, b, send)
    assert len(drain(recv)) == 24
    assert first_answer == [1] and slow.embedder.most_out == 1  # one at a time (the server computes one anyway)
    assert [len(c) for c in slow.embedder.calls][0] == 2


async def test_a_fast_backend_gets_full_requests_and_more_in_flight(tmp_path, autojump_clock) -> None:
    # journal writes run in threads: the clock must not jump while one is still writing (a
    # busy disk), or the measurement it jumps past looks stale (tests/stages/conftest.py)
    autojump_clock.autojump_threshold = IO_SETTLE
    w = make_world(tmp_path, cold_items=None)
    w.embedder.latency = 0.05  # a GPU server: 64 texts in 50 ms, many requests at once
    send, recv = trio.open_memory_channel[list[str]](10_000)
    try:
        batches = [[w.work(1000 * k + i) for i in range(64)] for k in range(10)]
        claimed = [await claim_all(w, b) for b in batches]
        async with trio.open_nursery() as n:  # CONCURRENCY_LIMIT embed workers
            for k in range(w.p.config.concurrency_limit):
                async def worker(mine: list[list]) -> None:
                    for b in mine:
                        await embed.compute_batch(w.p.stages.embed, b, send)
                n.start_soon(worker, claimed[k :: w.p.config.concurrency_limit])
        assert len(drain(recv)) == 640
        sizes = [len(c) for c in w.embedder.calls]
        assert sizes[0] == 2 and max(sizes) == 64  # from a small first request to full ones
        assert 1 < w.embedder.most_out <= w.p.config.concurrency_limit
        d = _limiter(w).plan()
        assert (d.max_items, d.max_in_flight) == (64, w.p.config.concurrency_limit)
    finally:
        w.close()


async def test_a_call_that_never_answers_ends_by_the_stages_own_bound_and_frees_its_slot(slow: World, autojump_clock) -> None:
    """An adapter that does not honour the timeout it is given (a dripping body, a plug-in)
    cannot hold the backend's only request slot for ever: the stage bounds the call, the
    task goes back (a timeout is never the task's fault), and the next request goes out."""
    send, recv = trio.open_memory_channel[list[str]](1000)
    hung = trio.Event()

    async def before(texts: Sequence[str]) -> None:
        if any("HANG" in t for t in texts):
            hung.set()
            await trio.sleep_forever()

    slow.embedder.before = before
    claimed = await claim_all(slow, [slow.work(1, "this one HANGs"), *_texts(slow, 3, first=10)])
    async with trio.open_nursery() as n:
        n.start_soon(embed.compute_batch, slow.p.stages.embed, claimed[:1], send)
        await hung.wait()
        await embed.compute_batch(slow.p.stages.embed, claimed[1:], send)  # waits for the slot, then goes
    assert sorted(drain(recv)) == sorted(w.id for w in claimed[1:])
    assert {p.task_id for p in slow.api.sent("pending")} == {tid(1)}  # handed back, not failed
    lim = _limiter(slow)
    assert lim.in_flight == 0 and lim.state.timeouts == 1
    assert slow.embedder.most_out == 1


async def test_at_shutdown_a_request_still_waiting_for_its_slot_is_not_sent(slow: World, autojump_clock) -> None:
    autojump_clock.autojump_threshold = IO_SETTLE  # a call held open while the journal is written
    send, recv = trio.open_memory_channel[list[str]](1000)
    entered, gate = trio.Event(), trio.Event()

    async def before(texts: Sequence[str]) -> None:
        if not entered.is_set():
            entered.set()
            await gate.wait()

    slow.embedder.before = before
    first = await claim_all(slow, _texts(slow, 2))
    second = await claim_all(slow, _texts(slow, 4, first=50))
    async with trio.open_nursery() as n:
        n.start_soon(embed.compute_batch, slow.p.stages.embed, first, send)
        await entered.wait()
        n.start_soon(embed.compute_batch, slow.p.stages.embed, second, send)  # waits: one request at a time
        await trio.sleep(1.0)
        slow.p.stopping.set()
        await trio.sleep(1.0)
        assert {p.task_id for p in slow.api.sent("pending")} == {w.id for w in second}  # released at once
        gate.set()  # the request already out finishes and is reported
    assert sorted(drain(recv)) == sorted(w.id for w in first)
    assert len(slow.embedder.calls) == 1
    assert all(slow.p.book.phase(w.id) in (None, Phase.COMPUTED) for w in first + second)
    assert slow.metric("ai_tasks_released_total", reason="shutdown") == 4


async def test_a_timeout_shrinks_the_next_request_and_lengthens_nothing_past_the_cap(slow: World, autojump_clock) -> None:
    """The server slows down tenfold after it was measured: the request that outlives its
    (measured) timeout is split, the limiter halves its sizes, and every task still succeeds."""
    send, recv = trio.open_memory_channel[list[str]](1000)
    await _compute(slow, _texts(slow, 24), send)  # measured at 1 s per text
    before = _limiter(slow).plan()
    assert before.measured and before.max_items >= 5
    slow.embedder.per_char = 10 * SLOW
    works = _texts(slow, 24, first=500)
    await _compute(slow, works, send)
    got = drain(recv)
    assert set(w.id for w in works) <= set(got)
    lim = _limiter(slow)
    assert lim.state.timeouts >= 1
    assert lim.plan().max_items < before.max_items
    assert all(t is not None and t <= _limiter(slow).cfg.timeout_cap for t in slow.embedder.timeouts)


def test_the_stage_bound_is_above_the_request_timeout(tmp_path) -> None:
    from processor.effects.adaptive import AdaptiveLimits
    from processor.pure.tasks import Backend
    from tests.stages.conftest import settings_for

    s = settings_for(tmp_path)
    limits = AdaptiveLimits.from_settings(s)
    assert limits.get(Backend.MOCK, MODEL).cfg.timeout_cap == s.openai_timeout
    for backend in Backend:
        lim = limits.get(backend, MODEL)
        for t in (0.1, 15.0, 60.0, 600.0):
            b = embed.backstop(lim, t)
            assert b >= 2 * t + embed.BACKSTOP_MIN
            if backend is Backend.OLLAMA:  # a call may pull its model first
                assert b >= s.ollama_model_download_timeout + t
    assert ad.Config(max_items=1, max_in_flight=1, timeout_cap=1.0).cold_items == 2


async def test_an_adapter_without_a_per_call_timeout_is_still_served(tmp_path, autojump_clock) -> None:
    """An older or plug-in adapter whose `embed` takes no `timeout=`: called without one
    (the stage's own bound still applies), never taken for a malformed answer."""
    from processor.kinds.embedding import takes_timeout
    from tests.stages.conftest import FakeEmbedder

    class Older(FakeEmbedder):
        async def embed(self, model: str, texts: Sequence[str]):  # type: ignore[override]
            return await super().embed(model, texts)

    w = make_world(tmp_path, embedder=Older(), cold_items=None)
    send, recv = trio.open_memory_channel[list[str]](100)
    try:
        assert not takes_timeout(w.embedder) and takes_timeout(FakeEmbedder())
        await _compute(w, [w.work(i) for i in range(6)], send)
        assert len(drain(recv)) == 6 and w.embedder.timeouts == [None] * len(w.embedder.calls)
        assert w.api.sent("pending") == []
    finally:
        w.close()
