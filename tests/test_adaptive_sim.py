"""The adaptive limiter (effects/adaptive.py over pure/adaptive.py) against in-process
models of a slow CPU server and a fast one, on trio's virtual clock.

The slow model is the server of issue 11: it computes one request at a time in arrival
order, 1 s per 2,000 characters, and keeps computing requests the client abandoned. The
driver does what the embed stage does: CONCURRENCY_LIMIT workers, each with a batch of
up to MAX_BATCH_SIZE texts, sent in requests sized by the limiter; a request that timed
out goes back to be sent again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.effects.adaptive import AdaptiveLimiter, AdaptiveLimits, classify
from processor.pure import adaptive as ad
from processor.pure.faults import Fault

MAX_BATCH = 64
CONCURRENCY = 5


class SimTimeout(Exception):
    fault = Fault.TIMEOUT


class SimBusy(Exception):
    fault = Fault.BUSY
    status = 503


@attrs.define
class FakeServer:
    """`base + chars * seconds_per_char` seconds per request; `serial`: one at a time, in
    arrival order, abandoned requests included. `slow_down_after`: texts computed before the
    server gets `slow_down` times slower (another tenant, thermal throttling)."""

    seconds_per_char: float
    serial: bool = True
    base: float = 0.0
    slow_down_after: int | None = None
    slow_down: float = 1.0
    busy_until: float = 0.0
    computed: int = 0
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    sizes: list[int] = attrs.field(factory=list)

    async def embed(self, texts: Sequence[str], *, timeout: float) -> list[int]:
        now = trio.current_time()
        factor = self.slow_down if self.slow_down_after is not None and self.computed >= self.slow_down_after else 1.0
        service = (self.base + sum(map(len, texts)) * self.seconds_per_char) * factor
        done = (max(now, self.busy_until) if self.serial else now) + service
        if self.serial:
            self.busy_until = done  # computed even if the client gives up
        self.computed += len(texts)
        self.requests += 1
        self.sizes.append(len(texts))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if done - now > timeout:
                await trio.sleep(timeout)
                raise SimTimeout(f"no answer in {timeout:.1f} s")
            await trio.sleep_until(done)
            return [len(t) for t in texts]
        finally:
            self.in_flight -= 1


@attrs.define
class Tally:
    done: Counter[int] = attrs.field(factory=Counter)
    abandoned: Counter[int] = attrs.field(factory=Counter)
    timeouts: int = 0
    violations: list[str] = attrs.field(factory=list)
    finished_at: float = 0.0


async def drive(limiter: Any, server: FakeServer, texts: list[str], *, workers: int = CONCURRENCY, batch: int = MAX_BATCH,
                until: float = 3600.0) -> Tally:
    """Workers take batches from a shared queue and send them in the limiter's sizes."""
    queue = list(range(len(texts)))
    tally = Tally()
    start = trio.current_time()

    async def worker() -> None:
        while queue:
            mine, queue[:] = queue[:batch], queue[batch:]
            while mine:
                chunk: list[int] = []
                try:
                    async with limiter.slot() as slot:
                        if limiter.in_flight > slot.decision.max_in_flight:
                            tally.violations.append(f"{limiter.in_flight} in flight, {slot.decision.max_in_flight} allowed")
                        chunk, mine = slot.take(mine, size=lambda i: len(texts[i]))
                        timeout = slot.start(len(chunk), sum(len(texts[i]) for i in chunk))
                        await server.embed([texts[i] for i in chunk], timeout=timeout)
                except SimTimeout:
                    tally.timeouts += 1
                    tally.abandoned.update(chunk)
                    mine = chunk + mine  # sent again (the stage splits and retries)
                    continue
                tally.done.update(chunk)

    with trio.move_on_after(until):
        async with trio.open_nursery() as n:
            for _ in range(workers):
                n.start_soon(worker)
    tally.finished_at = trio.current_time() - start
    return tally


def slow_texts(n: int = 128) -> list[str]:
    return [f"{i:05d}" + "x" * 1995 for i in range(n)]  # 2,000 characters each


def limiter_for(timeout_cap: float) -> AdaptiveLimiter:
    return AdaptiveLimits(max_items=MAX_BATCH, max_in_flight=CONCURRENCY, timeouts={"backend": timeout_cap}).get("backend", "model")


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.mark.parametrize("timeout_cap", [60.0, 120.0], ids=["OPENAI_TIMEOUT", "OLLAMA_TIMEOUT"])
async def test_slow_cpu_server_finishes_128_texts_without_piling_up_timeouts(timeout_cap, mock_clock):
    server = FakeServer(seconds_per_char=1 / 2000)  # 1 s per 2,000-character text
    limiter = limiter_for(timeout_cap)
    tally = await drive(limiter, server, slow_texts())
    assert sorted(tally.done) == list(range(128)) and set(tally.done.values()) == {1}
    assert tally.timeouts == 0 and not tally.abandoned
    assert not tally.violations
    assert server.computed == 128  # no work thrown away
    assert tally.finished_at <= 240  # virtual seconds; the server alone needs 128
    # it found what the operator found by hand: one request at a time, of 5-15 s
    assert server.sizes[0] == limiter.cfg.cold_items and server.max_in_flight == 1
    d = limiter.plan()
    assert d.max_in_flight == 1 and 5 <= d.max_items <= 15


async def test_fixed_defaults_against_the_slow_server_reproduce_the_defect(mock_clock):
    """The same model and driver with the old fixed sizes (64 texts, 5 in flight, the
    OpenAI adapter's 60 s + 0.05 s per input): nothing is done within 300 s."""

    class Fixed:
        in_flight = 0

        def __init__(self) -> None:
            self.sem = trio.Semaphore(CONCURRENCY)

        def slot(self) -> Any:
            outer = self

            class S:
                decision = ad.Decision(MAX_BATCH, float("inf"), CONCURRENCY, True)

                def take(self, items: list[int], *, size: Callable[[int], int]) -> tuple[list[int], list[int]]:
                    return items[:MAX_BATCH], items[MAX_BATCH:]

                def start(self, items: int, chars: int) -> float:
                    return 60.0 + 0.05 * items

                async def __aenter__(self) -> S:
                    await outer.sem.acquire()
                    return self

                async def __aexit__(self, *exc: object) -> None:
                    outer.sem.release()

            return S()

    server = FakeServer(seconds_per_char=1 / 2000)
    tally = await drive(Fixed(), server, slow_texts(), until=300.0)
    assert sum(tally.done.values()) == 0
    assert tally.timeouts >= 8 and max(tally.abandoned.values()) >= 2


async def test_fast_server_reaches_full_batches_and_concurrency(mock_clock):
    server = FakeServer(seconds_per_char=1e-7, serial=False, base=0.002)  # a GPU server or the mock
    limiter = limiter_for(60.0)
    texts = [f"text {i}" * 8 for i in range(3000)]
    tally = await drive(limiter, server, texts)
    assert sum(tally.done.values()) == 3000 and tally.timeouts == 0
    assert not tally.violations
    d = limiter.plan()
    assert (d.max_items, d.max_in_flight) == (MAX_BATCH, CONCURRENCY)
    assert server.max_in_flight == CONCURRENCY
    # quickly: a few rounds of growth, then only full requests (but the last one)
    first_full = server.sizes.index(MAX_BATCH)
    assert first_full <= 25
    assert all(size == MAX_BATCH for size in server.sizes[first_full:-1])


async def test_a_server_that_slows_down_fourfold_is_followed(mock_clock):
    server = FakeServer(seconds_per_char=1 / 8000, slow_down_after=200, slow_down=4.0)  # 0.25 s/text, then 1 s/text
    limiter = limiter_for(60.0)
    tally = await drive(limiter, server, slow_texts(320))
    assert sum(tally.done.values()) == 320
    assert tally.timeouts <= 2
    assert max(tally.abandoned.values(), default=0) <= 1
    assert not tally.violations
    assert limiter.plan().max_items <= 15  # sized again for about 10 s at 1 text/s


async def test_busy_answers_halve_requests_in_flight(mock_clock):
    limiter = limiter_for(60.0)
    for _ in range(20):  # a fast server: up to full concurrency
        async with limiter.slot() as slot:
            slot.start(slot.max_items, slot.max_items * 10)
            await trio.sleep(0.001)
    assert limiter.plan().max_in_flight == CONCURRENCY
    with pytest.raises(SimBusy):
        async with limiter.slot() as slot:
            slot.start(4, 40)
            raise SimBusy("queue full")
    assert limiter.plan().max_in_flight == CONCURRENCY // 2
    assert limiter.state.busy == 1


async def test_shrinking_lets_requests_out_finish_and_holds_new_ones(mock_clock):
    limiter = limiter_for(60.0)
    for _ in range(20):
        async with limiter.slot() as slot:
            slot.start(slot.max_items, slot.max_items * 10)
            await trio.sleep(0.001)
    assert limiter.plan().max_in_flight == CONCURRENCY
    started: list[float] = []
    release = trio.Event()

    async def hold(timeout_first: bool) -> None:
        try:
            async with limiter.slot() as slot:
                started.append(trio.current_time())
                slot.start(4, 40)
                if timeout_first:
                    await trio.sleep(1)
                    raise SimTimeout("late")
                await release.wait()
        except SimTimeout:
            pass

    async with trio.open_nursery() as n:
        for i in range(CONCURRENCY):
            n.start_soon(hold, i == 0)
        await trio.sleep(2)  # the first timed out: limit 5 // 2 = 2, four still out
        assert limiter.plan().max_in_flight == 2 and limiter.in_flight == 4
        n.start_soon(hold, False)
        await trio.sleep(5)
        assert len(started) == CONCURRENCY and limiter.in_flight == 4  # the new one waits
        release.set()
    assert len(started) == CONCURRENCY + 1


async def test_cancelled_request_records_nothing_and_frees_its_slot(mock_clock):
    limiter = limiter_for(60.0)
    with trio.move_on_after(1):
        async with limiter.slot() as slot:
            slot.start(2, 4000)
            await trio.sleep(10)
    assert limiter.state == ad.initial(limiter.cfg)
    assert limiter.in_flight == 0


async def test_an_error_caught_inside_the_slot_is_recorded(mock_clock):
    limiter = limiter_for(60.0)
    async with limiter.slot() as slot:
        slot.start(2, 4000)
        await trio.sleep(60)
        try:
            raise SimTimeout("late")
        except SimTimeout as exc:
            slot.record_error(exc)
    assert limiter.state.timeouts == 1 and limiter.plan().max_items == 1
    assert limiter.timeout_for(1, 2000) == 60.0  # 1 text, at most 66 chars/s: still the cap


async def test_limiters_per_model_are_bounded():
    from processor.effects import adaptive as ea

    limits = AdaptiveLimits(max_items=8, max_in_flight=2, timeouts={})
    first = limits.get("b", "m0")
    for i in range(ea.MAX_LIMITERS * 3):
        limits.get("b", f"m{i}")
    assert len(limits.snapshot()) == ea.MAX_LIMITERS
    assert limits.get("b", "m0") is not first  # evicted, made again


def test_classify_by_kind_and_status():
    class E(Exception):
        def __init__(self, kind: Any = None, status: int | None = None) -> None:
            self.kind, self.status = kind, status

    from processor.effects.backends.base import EmbedError
    from processor.pure.faults import Fault

    assert classify(EmbedError("t", Fault.TIMEOUT)) is ad.Outcome.TIMEOUT
    assert classify(EmbedError("r", Fault.RATE_LIMITED)) is ad.Outcome.BUSY
    assert classify(EmbedError("503", Fault.BUSY, status=503)) is ad.Outcome.BUSY
    assert classify(EmbedError("500", Fault.SERVER, status=500)) is ad.Outcome.ERROR
    assert classify(SimTimeout()) is ad.Outcome.TIMEOUT and classify(SimBusy()) is ad.Outcome.BUSY
    assert classify(E()) is ad.Outcome.ERROR
    assert classify(trio.Cancelled._create()) is None  # type: ignore[attr-defined]


# -- the adapters take the limiter's timeout (real HTTP on loopback, the sandbox's slow server) --


@pytest.mark.parametrize("backend", ["openai", "ollama"])
async def test_adapters_take_a_per_call_timeout(backend, nursery):
    from processor.effects.backends.base import EmbedError
    from processor.effects.backends.ollama import OllamaBackend
    from processor.effects.backends.openai import OpenAIBackend
    from processor.effects.metrics import Metrics
    from processor.sandbox import serve_asgi
    from processor.sandbox.fake_backends import FakeBackendState, FakeEmbeddings

    fake = FakeBackendState(dim=768 if backend == "ollama" else 1024, base=0.0, per_input=0.0, slow_per_char=1 / 2000)
    stop = trio.Event()
    url = await nursery.start(lambda task_status: serve_asgi(FakeEmbeddings(fake), "127.0.0.1", 0, shutdown=stop, task_status=task_status))
    adapter: Any
    if backend == "ollama":
        adapter = OllamaBackend(base_url=url, models=["nomic-embed-text"], timeout=30, download_timeout=30, keep_alive="5m",
                                truncate=True, max_batch=8, metrics=Metrics())
        await adapter.start()
        model = "nomic-embed-text"
    else:
        adapter = OpenAIBackend(api_key="sk-test-adaptive-timeout", base_url=url, dimensions=1024, timeout=30, max_batch=8, metrics=Metrics())
        model = "text-embedding-3-small"
    text = "x" * 1000  # half a second of the server's compute: no answer can come sooner
    try:
        with pytest.raises(EmbedError) as caught:
            await adapter.embed(model, [text], timeout=0.1)
        assert caught.value.fault is Fault.TIMEOUT
        assert classify(caught.value) is ad.Outcome.TIMEOUT
        # without one, the configured timeout (30 s): it waits behind the abandoned request
        result = await adapter.embed(model, [text])
        assert len(result.vectors) == 1
    finally:
        await adapter.aclose()
        stop.set()


# -- the shell never lets more out than the decision in force ---------------------------------

calls = st.lists(st.tuples(st.sampled_from(["ok", "timeout", "busy", "error"]), st.floats(0.0, 30.0), st.integers(1, 64)),
                 min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(max_items=st.integers(1, 64), max_in_flight=st.integers(1, 6), workers=st.integers(1, 8), script=calls)
def test_slots_never_exceed_the_decision_in_force(max_items, max_in_flight, workers, script):
    async def main() -> list[str]:
        limiter = AdaptiveLimits(max_items=max_items, max_in_flight=max_in_flight, timeouts={"b": 60.0}).get("b", "m")
        todo = list(script)
        bad: list[str] = []
        out = [0]  # bodies inside a slot, counted here (not by the limiter)

        async def worker() -> None:
            while todo:
                kind, seconds, size = todo.pop()
                try:
                    async with limiter.slot() as slot:
                        out[0] += 1
                        allowed = slot.decision.max_in_flight
                        if out[0] > allowed or allowed > max_in_flight:
                            bad.append(f"{out[0]} out, {allowed} allowed")
                        items = min(size, slot.max_items)
                        timeout = slot.start(items, items * 100)
                        if not (0 < timeout <= 60.0) or items > max_items:
                            bad.append(f"timeout {timeout}, items {items}")
                        await trio.sleep(min(seconds, timeout))
                        if kind == "timeout":
                            raise SimTimeout("late")
                        if kind == "busy":
                            raise SimBusy("busy")
                        if kind == "error":
                            raise ValueError("other")
                except (SimTimeout, SimBusy, ValueError):
                    pass
                finally:
                    out[0] -= 1

        async with trio.open_nursery() as n:
            for _ in range(workers):
                n.start_soon(worker)
        if limiter.in_flight != 0:
            bad.append(f"{limiter.in_flight} slots still taken")
        return bad

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == []
