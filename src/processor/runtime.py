"""What the stages share: the adapters, the book of tasks in hand, and reporting.

Task state lives only in the `Book` (`processor.book`, over the pure lifecycle); what to
do after an error comes only from `processor.pure.policy`; every retry loop is
`processor.effects.retrying.retrying`. The stages live in `processor.stages`;
`processor.daemon` wires them in one nursery.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import trio

from processor.board import Admission, BackendBoard
from processor.book import Book
from processor.effects.adaptive import AdaptiveLimits
from processor.effects.api import ApiError, TaskApi, fault_for_status
from processor.effects.auth import TokenProvider
from processor.effects.guard import Guard
from processor.effects.leases import Leases
from processor.effects.limiter import Limiter
from processor.effects.logs import get_logger
from processor.effects.metrics import Metrics
from processor.effects.retrying import Budget, retrying
from processor.effects.store import JournalStore, StoreError
from processor.kinds.base import KindPorts, TaskKind
from processor.pure import policy
from processor.pure import retry as schedule
from processor.pure.faults import Dependency, Fault
from processor.pure.lifecycle import Event, Outcome, Phase
from processor.pure.policy import Action
from processor.pure.tasks import Backend, Routing

RELEASE_TIMEOUT = 3.0  # the shielded clean-up bound at shutdown


@attrs.frozen
class StageConfig:
    """What the stages read of the settings (`processor.wiring.stage_config`); the names are
    the settings' own."""

    intake_capacity: int = 256
    max_batch_size: int = 64
    batch_max_wait_ms: int = 50
    concurrency_limit: int = 5
    polling_interval_seconds: float = 30.0
    max_retries: int = 3
    ollama_max_retries: int = 3
    retry_backoff_factor: float = 2.0
    retry_max_delay_seconds: float = 30.0
    max_task_attempts: int = 5
    fallback_models: Mapping[str, str] = attrs.field(factory=dict)


def api_fault(exc: ApiError) -> Fault:
    """The fault of a task API error (the adapter classified it; `effects.api.fault_for_status`)."""
    fault = getattr(exc, "fault", None)
    return fault if isinstance(fault, Fault) else fault_for_status(exc.status)


def api_retryable(exc: BaseException) -> bool | float:
    """`on` for the retry primitive: the policy's RETRY/PACE rows of the task API."""
    if not isinstance(exc, ApiError):
        return False
    if not exc.sent:  # never left (no token yet, breaker open): wait, unless the request cannot be built
        return api_fault(exc) is not Fault.INPUT
    r = policy.rule(Dependency.TASK_API, api_fault(exc))
    if r.action is Action.PACE:
        return exc.retry_after if exc.retry_after is not None else True
    if r.action in (Action.RETRY, Action.REFRESH_TOKEN):
        return True
    return False


class Runtime:
    def __init__(
        self,
        config: StageConfig,
        *,
        metrics: Metrics,
        api: TaskApi,
        tokens: TokenProvider,
        backends: dict[Backend, Any],
        backend_guards: dict[Backend, Guard],
        limiter: Limiter,
        openai_limiter: Limiter,
        journal: JournalStore,
        leases: Leases,
        routing: Routing,
        kinds: Mapping[str, TaskKind] | None = None,
        chat: Mapping[Backend, Any] | None = None,
        wikidata: Any = None,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
        adaptive: AdaptiveLimits | None = None,
    ) -> None:
        from processor.kinds.embedding import EmbeddingKind

        self.s = config  # the stages' settings
        self.metrics = metrics
        self.api = api
        self.tokens = tokens
        self.journal = journal
        if adaptive is None:  # the configured timeouts come from the composition root (`AdaptiveLimits.from_settings`)
            adaptive = AdaptiveLimits(max_items=config.max_batch_size, max_in_flight=config.concurrency_limit, timeouts={})
        self.board = BackendBoard(backends, backend_guards, adaptive=adaptive)
        self.admission = Admission(limiter, openai_limiter, leases)
        self.api_budget = Budget()
        self.routing = routing
        self.kinds: Mapping[str, TaskKind] = kinds if kinds is not None else {"text_embedding": EmbeddingKind()}
        from processor.stages.budget import BudgetPort

        self.ports = KindPorts(embedding=backends, chat=chat or {}, wikidata=wikidata,
                               budget=BudgetPort(self) if getattr(limiter, "budgets", False) else None)
        self.rng = rng or random.Random()
        self.wall = wall
        self.book = Book(capacity=config.intake_capacity, journal=journal, leases=leases, api=api, metrics=metrics,
                         refund=self._refund, wall=wall)
        self.stopping = trio.Event()
        self.log = get_logger("daemon")

    # read-only views for the daemon's health, metrics and tests
    @property
    def backends(self) -> dict[Backend, Any]:
        return self.board.adapters

    @property
    def backend_guards(self) -> dict[Backend, Guard]:
        return self.board.guards

    @property
    def backend_down(self) -> dict[Backend, str]:
        return self.board.down

    @property
    def quota_exhausted(self) -> dict[Backend, str]:
        return self.board.quota

    @property
    def unservable(self) -> dict[str, str]:
        return self.board.unservable

    @property
    def limiter(self) -> Limiter:
        return self.admission.limiter

    @property
    def openai_limiter(self) -> Limiter:
        return self.admission.openai_limiter

    @property
    def leases(self) -> Leases:
        return self.admission.leases

    @property
    def admission_paused_until(self) -> float:
        return self.admission.paused_until

    def backoff(self, attempt: int) -> float:
        """Full-jitter delay before retry `attempt` (pure schedule, this process's draw)."""
        policy = schedule.RetryPolicy(base=0.5, factor=self.s.retry_backoff_factor, cap=self.s.retry_max_delay_seconds)
        return schedule.backoff(policy, attempt, self.rng.random())

    async def _refund(self, limiter: str, reservations: list[Any]) -> None:
        lim = self.admission.limiter if limiter == "global" else self.admission.openai_limiter
        await lim.refund(reservations)

    @property
    def outbox_size(self) -> int:
        return self.book.outbox_size

    # -- reporting -------------------------------------------------------------------------
    async def report(self, task_id: str, *, settle: bool = True) -> Outcome | None:
        """PATCH the task's final state until the API takes it. Returns the outcome the story
        ended with (what the API took, the last one it refused, or the one of a task gone);
        None when given up at shutdown (the outbox keeps the result for the next start) or
        when there was nothing to report. `settle=False`: the caller fires REPORT_OK for a
        taken report itself (one journal transaction for a whole batch)."""
        last: Outcome | None = None
        while True:
            rec = self.book.records.get(task_id)
            if rec is None or rec.outcome is None:
                return last
            o = last = rec.outcome
            try:
                await self._patch_final(task_id, o)
            except ApiError as exc:
                fault = api_fault(exc)
                refused = fault in (Fault.REFUSED, Fault.NOT_FOUND, Fault.INPUT) and (exc.sent or fault is Fault.INPUT)
                if not refused:
                    return None  # given up at shutdown: the outbox keeps the result
                if fault is Fault.NOT_FOUND:
                    self.log.warning("report_task_gone", task_id=task_id, error=str(exc))
                    await self.book.move([task_id], Event.REPORT_OK)
                    return o
                self.log.error("report_rejected", task_id=task_id, status=exc.status, state=o.state, error=str(exc))
                self.metrics.rejected.labels(f"report_{exc.status}").inc()
                await self.book.move([task_id], Event.REPORT_REFUSED, why=f"{exc.status}: {exc}"[:300])
                continue  # a refused success is reported `failed` with why; a refused failure ends it
            if settle:
                await self.book.move([task_id], Event.REPORT_OK)
            return o

    async def _patch_final(self, task_id: str, o: Outcome) -> None:
        attempts = 1_000_000 if not self.stopping.is_set() else 3
        async for attempt in retrying(name="report", on=self._report_retryable, attempts=attempts, base=0.5,
                                      factor=self.s.retry_backoff_factor, cap=self.s.retry_max_delay_seconds,
                                      budget=None, rng=self.rng):
            with attempt:
                if attempt.number > 1:
                    await self.api.guard.wait_until_allowed()
                if o.state == "succeeded":
                    await self.api.patch(task_id, "succeeded", o.result, include_result=True)
                else:
                    await self.api.patch(task_id, "failed", None, include_result=True, reason=o.reason)

    def _report_retryable(self, exc: BaseException) -> bool | float:
        # a 403 on a report is a permission to fix, not a refused result: the outbox waits
        verdict = True if isinstance(exc, ApiError) and exc.sent and api_fault(exc) is Fault.AUTH else api_retryable(exc)
        if verdict is False:
            return False
        if self.stopping.is_set() and isinstance(exc, ApiError) and not exc.sent:
            return False
        self.metrics.retries.labels("api", "report").inc()
        return verdict

    async def deliver(self, outcomes: Mapping[str, Outcome]) -> list[str]:
        """Results first go to the outbox (one transaction), then to the reporter. Tasks whose
        lease was lost are abandoned instead. Returns the ids to report."""
        lost = self.admission.leases.lost() & set(outcomes)
        if lost:
            await self.book.abandon(sorted(lost))
        keep = {i: o for i, o in outcomes.items() if i not in lost and i in self.book.records}
        if not keep:
            return []
        computed = sum(1 for i in keep if self.book.phase(i) in (Phase.CLAIMED, Phase.DISPATCHED))
        steps = self.book.fire_each(keep, Event.COMPUTED)
        try:
            await self.book.perform(steps)
        except StoreError as exc:
            # the outbox cannot be written: the results are reported all the same (losing a
            # computed result, or ending the pipeline, would be worse than a crash before the
            # report sends it again); the store's failure shows in /ready
            self.log.error("outbox_write_failed", error=str(exc), count=len(keep), action="reporting without the outbox")
            self.metrics.rejected.labels("outbox_write_failed").inc(len(keep))
        if computed:
            self.metrics.stage_tasks.labels("computed").inc(computed)
        return list(keep)

    async def finished(self, task_ids: Sequence[str]) -> None:
        """Metrics for reports the API took."""
        self.metrics.stage_tasks.labels("reported").inc(len(task_ids))
