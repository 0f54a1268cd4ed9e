"""What the stages share: the adapters, the tasks in hand, and the two ways a claim ends
(reported, or released back to `pending`).

The stages themselves live in `processor.stages`; `processor.daemon` wires them in one
nursery. Everything here runs on the Trio thread; the only blocking I/O (SQLite) goes
through `trio.to_thread`.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import attrs
import trio

from processor.config import Settings
from processor.effects.api import ApiError, TaskApi
from processor.effects.auth import TokenProvider
from processor.effects.backends.base import EmbeddingBackend
from processor.effects.guard import Guard
from processor.effects.leases import Leases
from processor.effects.limiter import Limiter, LimiterError
from processor.effects.logs import get_logger
from processor.effects.metrics import Metrics
from processor.effects.store import JournalStore, OutboxRow
from processor.pure import retry
from processor.pure.ratelimit import Reservation
from processor.pure.retry import ErrorKind
from processor.pure.tasks import Backend, Routing, Task

RELEASE_TIMEOUT = 3.0  # the shielded clean-up bound at shutdown
RECENT_TTL = 120.0  # seconds a finished id is remembered (a stale poll may still list it)
RECENT_MAX = 50_000


@attrs.define
class Held:
    """A task this process has taken from the pending list and not yet let go."""

    task: Task
    reservation: Reservation | None = None  # what the global limiter charged for this task
    openai_reservation: Reservation | None = None  # and the OpenAI limiter
    claimed: bool = False  # PATCH in_progress answered 2xx
    claimed_at: float | None = None  # trio time
    computed: bool = False  # result is in the outbox


@attrs.frozen
class Outcome:
    """A computed result on its way to the API (already in the outbox)."""

    task_id: str
    state: str  # "succeeded" | "failed"
    vector: list[float] | None = None
    reason: str | None = None
    created_at: float | None = None


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics,
        api: TaskApi,
        tokens: TokenProvider,
        backends: dict[Backend, EmbeddingBackend],
        backend_guards: dict[Backend, Guard],
        limiter: Limiter,
        openai_limiter: Limiter,
        journal: JournalStore,
        leases: Leases,
        routing: Routing,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.s = settings
        self.metrics = metrics
        self.api = api
        self.tokens = tokens
        self.backends = backends
        self.backend_guards = backend_guards
        self.limiter = limiter
        self.openai_limiter = openai_limiter
        self.journal = journal
        self.leases = leases
        self.routing = routing
        self.rng = rng or random.Random()
        self.wall = wall
        self.held: dict[str, Held] = {}
        self.recent: OrderedDict[str, float] = OrderedDict()
        self.attempts: dict[str, int] = {}  # transient failures per task (this process)
        self.quota_exhausted: dict[Backend, str] = {}
        self.backend_down: dict[Backend, str] = {}
        self.stopping = trio.Event()
        self.room = trio.Event()  # set when held tasks drop below the low-water mark
        self.admission_paused_until = 0.0  # trio time; the limiter said nothing fits before
        self.claim_failures = 0  # consecutive claim PATCHes that failed (back-off)
        self.outbox_oldest: dict[str, float] = {}  # task id -> when its result was stored
        self.report_policy = retry.RetryPolicy(
            max_retries=1_000_000, base=0.5, factor=settings.retry_backoff_factor, cap=settings.retry_max_delay_seconds
        )
        self.log = get_logger("daemon")

    def backoff(self, attempt: int) -> float:
        """Full-jitter delay before retry `attempt` (pure schedule, this process's draw)."""
        return retry.backoff(self.report_policy, attempt, self.rng.random())

    @property
    def outbox_size(self) -> int:
        return len(self.outbox_oldest)

    # -- intake bookkeeping ----------------------------------------------------------
    @property
    def high_water(self) -> int:
        return self.s.intake_capacity

    def room_left(self) -> int:
        return max(0, self.high_water - len(self.held))

    def is_known(self, task_id: str) -> bool:
        if task_id in self.held:
            return True
        seen = self.recent.get(task_id)
        return seen is not None and trio.current_time() - seen < RECENT_TTL

    def hold(self, task: Task) -> None:
        self.held[task.id] = Held(task)
        self.metrics.in_flight.set(len(self.held))

    def unhold(self, task_id: str, *, finished: bool) -> None:
        self.held.pop(task_id, None)
        if finished:
            self.recent[task_id] = trio.current_time()
            self.recent.move_to_end(task_id)
            while len(self.recent) > RECENT_MAX:
                self.recent.popitem(last=False)
            self.attempts.pop(task_id, None)
        self.metrics.in_flight.set(len(self.held))
        if len(self.held) <= self.high_water // 2:
            self.room.set()

    async def wait_for_room(self) -> None:
        while len(self.held) > self.high_water // 2 and not self.stopping.is_set():
            self.room = trio.Event()
            with trio.move_on_after(1.0):
                await self.room.wait()

    # -- ending a claim ------------------------------------------------------------------
    async def refund(self, held: Sequence[Held]) -> None:
        """Give back the units reserved for tasks that never reached a backend."""
        for lim, attr in ((self.limiter, "reservation"), (self.openai_limiter, "openai_reservation")):
            reservations: list[Reservation] = []
            for h in held:
                r = getattr(h, attr)
                if r is not None:
                    reservations.append(r)
                    setattr(h, attr, None)
            if reservations:
                try:
                    await lim.refund(reservations)
                except LimiterError as exc:  # a refund that fails only makes the limiter stricter
                    self.log.warning("refund_failed", error=str(exc), units=len(reservations))

    async def release(self, task_ids: Sequence[str], reason: str, *, refund: bool = True) -> None:
        """Give claims back (PATCH pending) for tasks whose result was never computed."""
        items = [self.held[i] for i in task_ids if i in self.held and not self.held[i].computed]
        if not items:
            return
        if refund:
            await self.refund(items)
        released: list[str] = []

        async def one(h: Held) -> None:
            if h.claimed:
                try:
                    await self.api.patch(h.task.id, "pending")
                except ApiError as exc:
                    self.log.warning("release_failed", task_id=h.task.id, error=str(exc))
                    return  # the journal row stays: the next start releases it
            released.append(h.task.id)

        async with trio.open_nursery() as n:
            for h in items:
                n.start_soon(one, h)
        if released:
            try:
                await self.journal.remove_claims(released)
            except Exception as exc:
                self.log.warning("journal_update_failed", error=str(exc))
            await self.leases.release(released)
        for tid in [h.task.id for h in items]:
            self.unhold(tid, finished=False)
        self.metrics.released.labels(reason).inc(len(released))
        self.log.info("claims_released", count=len(released), reason=reason)

    async def store_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        """Write results to the outbox before they are reported (nothing lost on a crash)."""
        now = self.wall()
        rows = [OutboxRow(o.task_id, o.state, o.vector, o.reason, now, o.created_at) for o in outcomes]
        await self.journal.put_results(rows)
        for o in outcomes:
            if o.task_id in self.held:
                self.held[o.task_id].computed = True
            self.outbox_oldest[o.task_id] = now
        self._publish_outbox()

    def _publish_outbox(self) -> None:
        self.metrics.outbox_size.set(self.outbox_size)
        oldest = min(self.outbox_oldest.values(), default=None)
        self.metrics.outbox_oldest.set(0 if oldest is None else max(0.0, self.wall() - oldest))

    async def report(self, outcome: Outcome) -> bool:
        """PATCH the final state, retrying per policy. True when the API took it (or it is
        moot: 400/404), False when given up at shutdown (the outbox keeps it)."""
        attempt = 0
        guard = self.api.guard
        while True:
            try:
                if outcome.state == "succeeded":
                    await self.api.patch(outcome.task_id, "succeeded", outcome.vector, include_result=True)
                else:
                    await self.api.patch(outcome.task_id, "failed", None, include_result=True, reason=outcome.reason)
                return True
            except ApiError as exc:
                if exc.kind is ErrorKind.PERMANENT and exc.status in (400, 404, 409, 410, 413, 422):
                    self.log.error("report_rejected", task_id=outcome.task_id, status=exc.status, error=str(exc))
                    self.metrics.rejected.labels(f"report_{exc.status}").inc()
                    return True
                if self.stopping.is_set() and attempt >= 2:
                    return False
                decision = retry.decide(self.report_policy, attempt=attempt, elapsed=0.0, kind=ErrorKind.RETRYABLE,
                                     draw=self.rng.random(), retry_after=exc.retry_after)
                delay = decision.delay if isinstance(decision, retry.Retry) else self.s.retry_max_delay_seconds
                self.metrics.retries.labels("api", "report").inc()
                attempt += 1
                if attempt in (1, 5) or attempt % 20 == 0:
                    self.log.warning("report_retry", task_id=outcome.task_id, attempt=attempt, error=str(exc))
                await trio.sleep(delay)
                await guard.wait_until_allowed()

    async def finish(self, outcomes: Sequence[Outcome]) -> None:
        """The API has these reports: drop outbox and journal rows, leases, and hold."""
        ids = [o.task_id for o in outcomes]
        await self.journal.finish(ids)
        await self.leases.complete(ids)
        self.metrics.stage_tasks.labels("reported").inc(len(ids))
        now = trio.current_time()
        wall = self.wall()
        for o in outcomes:
            h = self.held.get(o.task_id)
            if h is not None and h.claimed_at is not None:
                self.metrics.task_duration.observe(now - h.claimed_at)
            if o.created_at is not None:
                self.metrics.e2e_latency.observe(max(0.0, wall - o.created_at))
            self.metrics.tasks_processed.labels("text_embedding", o.state).inc()
            self.outbox_oldest.pop(o.task_id, None)
            self.unhold(o.task_id, finished=True)
        self._publish_outbox()
