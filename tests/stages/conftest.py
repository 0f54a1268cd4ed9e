"""Fakes for the outside world only, and the real stages' ports over them (`build_pipeline`).

Each stage test drives the stage functions directly under `trio.testing.MockClock(autojump_threshold=0)`
(the `autojump_clock` fixture), with a real `Book` over a real SQLite `JournalStore` in
`tmp_path`, the real lifecycle, policy, guards and retry primitive. Fakes stand in for what
is outside this process: the task API (`FakeApi`), an embedding server (`FakeEmbedder`), the
rate-limit store (`FakeLimiter`); one replica needs no leases (`NoLeases`).

Virtual time and threads: SQLite calls run on a worker thread, and while the run loop waits
for one the autojump clock jumps to the next deadline. Tests that need an order between two
tasks therefore use events (`FakeEmbedder.before`), never racing timers. A backend call
held open by such an event still has a deadline (the stage bounds every call): a test that
does journal work meanwhile sets `autojump_clock.autojump_threshold = IO_SETTLE`, so that
the clock jumps only once the run loop has been idle that long in real time, never while a
thread is still writing (trio's advice for tests with I/O in flight).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from processor.config import Settings, load_settings
from processor.effects.adaptive import AdaptiveLimits
from processor.effects.api import ApiError
from processor.effects.backends.base import EmbedResult, RequestLimits
from processor.effects.guard import Guard
from processor.effects.leases import NoLeases
from processor.effects.limiter import LimiterError
from processor.effects.metrics import Metrics
from processor.effects.store import JournalStore
from processor.kinds.base import Work
from processor.pure import ratelimit as rl
from processor.pure.breaker import BreakerConfig
from processor.pure.faults import DependencyError, Fault
from processor.pure.retry import ErrorKind, classify_status
from processor.pure.tasks import Backend, Routing
from processor.stages import claim
from processor.wiring import Adapters, Pipeline, build_pipeline, stage_config

MODEL = "nomic-embed-text"
IO_SETTLE = 1.0  # real seconds the run loop must be idle before the autojump clock jumps (see above)
WALL0 = 1_800_000_000.0  # the fake wall clock: this epoch second at trio time 0


def tid(n: int) -> str:
    """A valid task id (24 lowercase hex)."""
    return f"{n:024x}"


def wall() -> float:
    return WALL0 + trio.current_time()


# -- the task API ------------------------------------------------------------------------
def http(status: int, text: str = "") -> ApiError:
    """The API answered `status` (the request reached it)."""
    return ApiError(f"HTTP {status} {text}".strip(), status=status, kind=classify_status(status))


def no_answer() -> ApiError:
    """The request left and no answer came (reset, timeout): it may have been applied."""
    return ApiError("PATCH: ReadError", status=None, kind=ErrorKind.RETRYABLE, fault=Fault.UNREACHABLE)


def never_sent() -> ApiError:
    """The request never left (no token yet, breaker open)."""
    return ApiError("task_api: circuit breaker open", status=None, kind=ErrorKind.RETRYABLE, sent=False,
                    fault=Fault.UNREACHABLE)


@attrs.frozen
class Patch:
    task_id: str
    state: str
    result: Any
    reason: str | None
    answer: str  # "ok" or the error's message


class FakeApi:
    """The task API: records every PATCH with the answer it got, answers each call from a
    per-(task, state) script (default: 2xx), serves a pending and an in_progress list."""

    def __init__(self) -> None:
        self.patches: list[Patch] = []
        self.states: dict[str, str] = {}  # what the API holds after the PATCHes it took
        self._script: dict[tuple[str, str], list[ApiError | None]] = {}
        self.always: dict[tuple[str, str], ApiError] = {}
        self.pending_list: list[Any] = []
        self.in_progress_list: list[Any] = []
        self.pending_errors: list[ApiError] = []  # the next pending() reads fail with these, in order
        self.polls = 0
        self.hold: dict[tuple[str, str], trio.Event] = {}  # a PATCH waits for this event before it is answered
        self.pending_reads = 0  # entries handed out by pending() streams
        self.guard = Guard("task_api", BreakerConfig(threshold=5, base_wait=2.0, max_wait=60.0))

    def answer(self, task_id: str, state: str, *answers: ApiError | None) -> None:
        """The next PATCHes of `task_id` to `state` get these answers (None: 2xx), then 2xx."""
        self._script.setdefault((task_id, state), []).extend(answers)

    def sent(self, state: str | None = None, task_id: str | None = None) -> list[Patch]:
        return [p for p in self.patches if (state is None or p.state == state) and (task_id is None or p.task_id == task_id)]

    async def patch(self, task_id: str, state: str, result: Any = None, *, include_result: bool = False,
                    reason: str | None = None) -> None:
        await trio.lowlevel.checkpoint()
        gate = self.hold.get((task_id, state))
        if gate is not None:
            await gate.wait()
        queue = self._script.get((task_id, state))
        err = queue.pop(0) if queue else self.always.get((task_id, state))
        self.patches.append(Patch(task_id, state, result if include_result else None, reason,
                                  "ok" if err is None else str(err)))
        if err is not None:
            raise err
        self.states[task_id] = state

    @asynccontextmanager
    async def pending(self) -> AsyncIterator[AsyncIterator[Any]]:
        self.polls += 1
        if self.pending_errors:
            raise self.pending_errors.pop(0)
        yield self._items(self.pending_list)

    @asynccontextmanager
    async def by_state(self, state: str) -> AsyncIterator[AsyncIterator[Any]]:
        assert state == "in_progress"
        yield self._items(self.in_progress_list)

    async def _items(self, items: Sequence[Any]) -> AsyncIterator[Any]:
        for raw in list(items):
            await trio.lowlevel.checkpoint()
            self.pending_reads += 1
            yield raw


# -- an embedding server ------------------------------------------------------------------
class FakeEmbedder:
    """An embedding backend. `faults` are raised per call, in order (None: answer);
    `poison` maps a word to the fault of every call whose texts contain it; texts in
    `malformed` get a vector with a NaN; `before(texts)` runs first (to order tasks).
    A call takes `latency + per_char * characters` seconds; `serial`: one call computed at
    a time, in arrival order (a CPU server). It records every call's texts, the timeout it
    was given, and the most calls it had out at once."""

    name = "fake"

    def __init__(self, dim: int = 4, *, max_items: int = 64, latency: float = 0.0) -> None:
        self.dim = dim
        self.max_items = max_items
        self.max_input_tokens: int | None = None
        self.latency = latency
        self.calls: list[list[str]] = []
        self.faults: list[Fault | None] = []
        self.poison: dict[str, Fault] = {}
        self.malformed: set[str] = set()
        self.answer_dim = dim  # the size of the vectors it answers (another size: DIMENSION)
        self.retry_after: float | None = None  # what a RATE_LIMITED answer asks for
        self.before: Callable[[Sequence[str]], Awaitable[None]] | None = None
        self.per_char = 0.0
        self.serial = False
        self.timeouts: list[float | None] = []
        self.out = 0  # calls being answered now
        self.most_out = 0
        self._turn = trio.Lock()

    def limits(self, model: str) -> RequestLimits:
        return RequestLimits(self.max_items, max_input_tokens=self.max_input_tokens)

    def expected_dim(self, model: str) -> int | None:
        return self.dim

    def learn_dim(self, model: str, dim: int) -> None:
        return None

    def vector(self, text: str) -> list[float]:
        return [1.0] + [0.0] * (self.answer_dim - 1)

    async def embed(self, model: str, texts: Sequence[str], *, timeout: float | None = None) -> EmbedResult:
        self.calls.append(list(texts))
        self.timeouts.append(timeout)
        self.out += 1
        self.most_out = max(self.most_out, self.out)
        try:
            return await self._answer(model, texts)
        finally:
            self.out -= 1

    async def _answer(self, model: str, texts: Sequence[str]) -> EmbedResult:
        if self.before is not None:
            await self.before(texts)
        cost = self.latency + self.per_char * sum(len(t) for t in texts)
        if cost and self.serial:
            async with self._turn:
                await trio.sleep(cost)
        elif cost:
            await trio.sleep(cost)
        fault = self.faults.pop(0) if self.faults else None
        if fault is None:
            fault = next((f for word, f in self.poison.items() if any(word in t for t in texts)), None)
        if fault is not None:
            raise DependencyError(f"fake {model}: {fault.value}", fault, status=_STATUS.get(fault),
                                  retry_after=self.retry_after if fault is Fault.RATE_LIMITED else None)
        return EmbedResult([[float("nan")] * self.answer_dim if t in self.malformed else self.vector(t) for t in texts])

    async def start(self) -> None:
        return None

    async def probe(self, model: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


_STATUS = {Fault.INPUT: 400, Fault.SERVER: 500, Fault.BUSY: 503, Fault.AUTH: 401, Fault.QUOTA: 429,
           Fault.RATE_LIMITED: 429, Fault.MODEL_MISSING: 404, Fault.PARAMETER: 400, Fault.TIMEOUT: 504}


# -- the rate-limit store ------------------------------------------------------------------
class FakeLimiter:
    """A limiter with `room` units left (None: no limit). Decisions have the real shape
    (reservations aligned with the request, None for a refused task). Records every
    reservation handed out, every refund call and every `reservation_at`."""

    budgets = False

    def __init__(self, name: str, *, room: int | None = None, retry_in: float = 7.0) -> None:
        self.name = name
        self.room = room
        self.retry_in = retry_in
        self.fail: LimiterError | None = None
        self.fail_refund: LimiterError | None = None
        self.admits: list[int] = []
        self.reserved: list[rl.Reservation] = []
        self.refunds: list[list[Any]] = []
        self.recovered: list[float] = []
        self._serial = 0

    @property
    def refunded(self) -> list[Any]:
        return [r for call in self.refunds for r in call]

    async def admit(self, n: int | Sequence[rl.Demand]) -> rl.Decision:
        await trio.lowlevel.checkpoint()
        count = n if isinstance(n, int) else len(n)
        self.admits.append(count)
        if self.fail is not None:
            raise self.fail
        k = count if self.room is None else max(0, min(count, self.room))
        if self.room is not None:
            self.room -= k
        t = self.now()
        out = []
        for _ in range(k):
            self._serial += 1
            out.append(rl.Reservation(t + self._serial / 1000.0, 1, ()))
        self.reserved += out
        return rl.Decision(count, k, reservations=(*out, *([None] * (count - k))), at=t,
                           retry_at=t + self.retry_in if k < count else None)

    async def refund(self, reservations: Sequence[rl.Reservation]) -> None:
        await trio.lowlevel.checkpoint()
        self.refunds.append(list(reservations))
        if self.fail_refund is not None:
            raise self.fail_refund
        if self.room is not None:
            self.room += len(reservations)

    async def settle(self, reservations: Sequence[rl.Reservation], *, tokens_in: int, tokens_out: int) -> tuple[rl.Reservation, ...]:
        return tuple(reservations)

    def reservation_at(self, at: float, units: int = 1) -> rl.Reservation:
        self.recovered.append(at)
        return rl.Reservation(at, units, ())

    def usage(self) -> list[rl.TierUsage]:
        return []

    def now(self) -> float:
        return wall()

    @property
    def healthy(self) -> tuple[bool, str | None]:
        return (self.fail is None, None if self.fail is None else str(self.fail))


# -- the stages' ports over them ------------------------------------------------------------------
@attrs.define
class World:
    p: Pipeline  # the shared state (`p.book`, `p.board`, ...) and each stage's port (`p.stages`)
    api: FakeApi
    embedder: FakeEmbedder
    limiter: FakeLimiter
    openai_limiter: FakeLimiter
    journal: JournalStore
    metrics: Metrics
    backend: Backend

    def work(self, n: int, text: str | None = None, *, model: str = MODEL, backend: Backend | None = None) -> Work:
        return Work(tid(n), "text_embedding", text if text is not None else f"text number {n}", model,
                    backend or self.backend, created_at=WALL0 - 60.0)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def journal_ids(self) -> set[str]:
        return {r[0] for r in self.journal.db.query("SELECT task_id FROM journal")}

    def outbox_ids(self) -> set[str]:
        return {r.task_id for r in self.journal.outbox()}

    def close(self) -> None:
        self.journal.db.close()


COLD_FULL = -1  # make_world: the first request may be a full batch


def settings_for(tmp_path: Any, **env: Any) -> Settings:
    base = {
        "API_BASE_URL": "http://127.0.0.1:9", "OAUTH2_TOKEN_URL": "http://127.0.0.1:9/token",
        "OAUTH2_CLIENT_ID": "stage-tests", "OAUTH2_CLIENT_SECRET": "not-a-secret",
        "PROCESSING_MODE": "mock", "STATE_DIR": str(tmp_path / "state"), "RATE_LIMIT_ENABLED": "false",
    }
    base.update({k: str(v) for k, v in env.items()})
    settings, _ = load_settings(base, dotenv_path=None)
    return settings


def make_world(tmp_path: Any, *, backend: Backend = Backend.MOCK, routing: Routing | None = None,
               embedder: FakeEmbedder | None = None, extra: dict[Backend, FakeEmbedder] | None = None,
               cold_items: int | None = COLD_FULL, limiter: Any = None, metrics: Metrics | None = None,
               leases: Any = None, **env: Any) -> World:
    """The stages over fakes: backend `backend` is `embedder` (and `extra` ones, each with its
    guard). `limiter`: the global limiter instead of a `FakeLimiter` (`World.limiter` stays
    the fake, unused then); `metrics`: the registry it counts into; `leases`: instead of
    `NoLeases` (one replica).

    `cold_items`: the first request's size while a backend's speed is unknown
    (`processor.pure.adaptive`). By default as large as MAX_BATCH_SIZE, so that a test sees
    the batch shapes of the behaviour it is about, not the adaptive ramp; None keeps the
    daemon's default (tests of the ramp itself)."""
    if cold_items == COLD_FULL:
        cold_items = settings_for(tmp_path, **env).max_batch_size
    s = settings_for(tmp_path, **env)
    (tmp_path / "state").mkdir(exist_ok=True)
    metrics = metrics or Metrics()
    api = FakeApi()
    emb = embedder or FakeEmbedder()
    lim, olim = FakeLimiter("global"), FakeLimiter("openai")
    journal = JournalStore(str(tmp_path / "state" / "journal.db"))
    adapters = {backend: emb, **(extra or {})}
    guards = {b: Guard(b.value, BreakerConfig(threshold=5, base_wait=5.0, max_wait=300.0)) for b in adapters}
    p = build_pipeline(
        stage_config(s),
        Adapters(backends=adapters, guards=guards, limiter=limiter or lim, openai_limiter=olim, leases=leases or NoLeases()),
        metrics=metrics, api=api, tokens=None, journal=journal,  # type: ignore[arg-type]
        routing=routing or Routing(default_model=MODEL, mock=True), wall=wall,
        adaptive=AdaptiveLimits.from_settings(s, **({} if cold_items is None else {"cold_items": cold_items})),
    )
    return World(p, api, emb, lim, olim, journal, metrics, backend)


@pytest.fixture
async def world(tmp_path: Any) -> AsyncIterator[World]:
    w = make_world(tmp_path)
    yield w
    w.close()


async def claim_all(w: World, works: Sequence[Work]) -> list[Work]:
    """Take `works` into the book and run the real claim stage over them; returns the
    works that came out claimed, in order."""
    intake_s, intake_r = trio.open_memory_channel[Work](len(works) + 1)
    out_s, out_r = trio.open_memory_channel[Work](len(works) + 1)
    for x in works:
        w.p.book.take(x)
        intake_s.send_nowait(x)
    intake_s.close()
    await claim.claimer(w.p.stages.claim, intake_r, out_s)
    out = []
    async with out_r:
        async for x in out_r:
            out.append(x)
    return sorted(out, key=lambda x: [y.id for y in works].index(x.id))


async def measure(w: World, *, first: int = 1_000_000) -> int:
    """Have the world's backend answer one batch (ids from `first`) so that its adaptive
    limiter has measured its speed: a backend not measured yet gets one request at a time,
    a measured, fast one more. Returns the requests it may now have out at once."""
    from processor.stages import embed

    works = await claim_all(w, [w.work(first + i) for i in range(2)])
    send, recv = trio.open_memory_channel[list[str]](10)
    await embed.compute_batch(w.p.stages.embed, works, send)
    assert sorted(drain(recv)) == sorted(x.id for x in works)
    assert w.p.board.adaptive is not None
    return w.p.board.adaptive.get(w.backend, MODEL).plan().max_in_flight


def drain(recv: trio.MemoryReceiveChannel[list[str]]) -> list[str]:
    """Every id the stage handed to the reporter so far."""
    out: list[str] = []
    while True:
        try:
            out += recv.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return out
