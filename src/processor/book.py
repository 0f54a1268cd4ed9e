"""The tasks in hand: the only place task state lives in this process.

Each task is a `processor.pure.lifecycle.Record`; the book fires lifecycle events and
performs the bookkeeping effects that come back (refunds, journal and outbox rows, attempt
counts, leases), batched per call. The PATCHes themselves are the stages' work (they need
the retry policy), except PATCH pending, which `release` sends itself.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import trio

from processor.effects.api import ApiError
from processor.effects.leases import Leases
from processor.effects.logs import get_logger
from processor.effects.metrics import Metrics
from processor.effects.store import ClaimRow, JournalStore, OutboxRow
from processor.kinds.base import Work
from processor.pure import lifecycle as lc
from processor.pure.lifecycle import Effect, Event, Outcome, Phase

_log = get_logger("lifecycle")
RECENT_TTL = 120.0  # seconds a finished id is remembered (a stale poll may still list it)
RECENT_MAX = 50_000



@attrs.frozen
class BookPorts:
    """Where the book's effects go: the journal and outbox, the leases, the task API (PATCH
    pending), the limiters' refund, the in-flight and outbox gauges, and the wall clock."""

    journal: JournalStore
    leases: Leases
    api: Any
    metrics: Metrics
    refund: Callable[[str, list[Any]], Any]  # (limiter name, reservations) -> awaitable
    wall: Callable[[], float] = time.time


class Book:
    """The records of the tasks in hand (and the ids finished lately), over `BookPorts`."""

    def __init__(
        self,
        *,
        capacity: int,
        journal: JournalStore,
        leases: Leases,
        api: Any,
        metrics: Metrics,
        refund: Callable[[str, list[Any]], Any],  # (limiter name, reservations) -> awaitable
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.capacity = capacity
        self.ports = BookPorts(journal=journal, leases=leases, api=api, metrics=metrics, refund=refund, wall=wall)
        self.records: dict[str, lc.Record] = {}
        self.works: dict[str, Work] = {}
        self.claimed_at: dict[str, float] = {}
        self.computed_at: dict[str, float] = {}  # wall time each result was stored (outbox age)
        self.recent: OrderedDict[str, float] = OrderedDict()
        self.room = trio.Event()
        # released tasks whose PATCH pending did not get through: `in_progress` at the API,
        # journal row kept; `stages.recovery.release_left` sends them again
        self.left: set[str] = set()

    # -- questions ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def phase(self, task_id: str) -> Phase | None:
        r = self.records.get(task_id)
        return None if r is None else r.phase

    def known(self, task_id: str) -> bool:
        if task_id in self.records:
            return True
        seen = self.recent.get(task_id)
        return seen is not None and trio.current_time() - seen < RECENT_TTL

    def room_left(self) -> int:
        return max(0, self.capacity - len(self.records))

    def in_phase(self, *phases: Phase) -> list[str]:
        return [i for i, r in self.records.items() if r.phase in phases]

    @property
    def outbox_size(self) -> int:
        return len(self.computed_at)

    def oldest_result_age(self) -> float:
        oldest = min(self.computed_at.values(), default=None)
        return 0.0 if oldest is None else max(0.0, self.ports.wall() - oldest)

    async def wait_for_room(self, stopping: trio.Event) -> None:
        while len(self.records) > self.capacity // 2 and not stopping.is_set():
            self.room = trio.Event()
            with trio.move_on_after(1.0):
                await self.room.wait()

    # -- entering -------------------------------------------------------------------------
    def take(self, work: Work) -> None:
        self.left.discard(work.id)
        self.records[work.id] = lc.Record(work.id)
        self.works[work.id] = work
        self.ports.metrics.in_flight.set(len(self.records))

    def add_charge(self, task_id: str, charge: tuple[str, Any]) -> None:
        """One more (limiter name, reservation) for a task in hand (a budget's reservation
        for a call asked again); settled or kept spent with the others."""
        r = self.records.get(task_id)
        if r is not None:
            self.records[task_id] = attrs.evolve(r, charges=(*r.charges, charge))

    def take_id(self, task_id: str) -> None:
        """An id without work (a defect reported at intake, a recovered row)."""
        self.left.discard(task_id)
        self.records[task_id] = lc.Record(task_id)
        self.ports.metrics.in_flight.set(len(self.records))

    # -- moving ---------------------------------------------------------------------------
    def fire(self, ids: Iterable[str], event: Event, **kw: Any) -> list[tuple[str, lc.Step]]:
        """Fire `event` for each id this book holds; returns the steps (effects not yet done)."""
        steps = []
        for i in ids:
            r = self.records.get(i)
            if r is None:
                continue
            step = lc.fire(r, event, **kw)
            self.records[i] = step.record
            steps.append((i, step))
        return steps

    def fire_each(self, items: Mapping[str, Outcome], event: Event) -> list[tuple[str, lc.Step]]:
        steps = []
        for i, outcome in items.items():
            steps += self.fire([i], event, outcome=outcome)
        return steps

    async def perform(self, steps: Sequence[tuple[str, lc.Step]], *, charges: Mapping[str, tuple[Any, ...]] | None = None) -> None:
        """Carry out the bookkeeping effects of `steps`, batched: one journal transaction per
        kind of write, one refund per (limiter, receipt). PATCH effects are the caller's."""
        want: dict[Effect, list[str]] = {}
        refunds: dict[str, list[Any]] = {}
        for task_id, step in steps:
            for eff in step.effects:
                want.setdefault(eff, []).append(task_id)
            if Effect.REFUND in step.effects:
                for name, receipt in (charges or {}).get(task_id, ()):
                    refunds.setdefault(name, []).append(receipt)
        for name, receipts in refunds.items():
            try:
                await self.ports.refund(name, receipts)
            except Exception as exc:  # a refund that fails only makes the limiter stricter
                _log.warning("refund_failed", limiter=name, units=len(receipts), error=str(exc))
        if Effect.WRITE_JOURNAL in want:
            now = self.ports.wall()
            rows = []
            for i in want[Effect.WRITE_JOURNAL]:
                w = self.works[i]
                r = next((r for name, r in self.records[i].charges if name == "global"), None)
                at = getattr(r, "at", None)
                rows.append(ClaimRow(i, w.text, w.model, w.backend.value, w.created_at, now,
                                     at if isinstance(at, float) else None, type=w.type))
            await self.ports.journal.add_claims(rows)  # StoreError propagates: the caller fires JOURNAL_FAILED
        if Effect.MARK_DISPATCHED in want:
            await self._quiet(self.ports.journal.mark_dispatched(want[Effect.MARK_DISPATCHED]), "journal_update_failed")
        if Effect.WRITE_OUTBOX in want:
            now = self.ports.wall()
            rows2 = []
            for i in want[Effect.WRITE_OUTBOX]:
                o = self.records[i].outcome
                assert o is not None
                known = self.works.get(i)
                rows2.append(OutboxRow(i, o.state, o.result, o.reason, now, known.created_at if known else None))
                self.computed_at.setdefault(i, now)
            await self.ports.journal.put_results(rows2)  # StoreError propagates: nothing is reported unstored
            self._publish_outbox()
        if Effect.COUNT_ATTEMPT in want:
            await self._quiet(self.ports.journal.count_attempts(want[Effect.COUNT_ATTEMPT], self.ports.wall()), "attempt_count_failed")
        if Effect.DELETE_JOURNAL in want:
            reported = set(want.get(Effect.COMPLETE_LEASE, ()))  # the story is over: attempts go too
            ended = [i for i in want[Effect.DELETE_JOURNAL] if i in reported]
            other = [i for i in want[Effect.DELETE_JOURNAL] if i not in reported]
            if ended:
                await self._quiet(self.ports.journal.finish(ended, attempts=True), "journal_update_failed")
            if other:
                await self._quiet(self.ports.journal.finish(other), "journal_update_failed")
        if Effect.RELEASE_LEASE in want:
            await self._quiet(self.ports.leases.release(want[Effect.RELEASE_LEASE]), "lease_release_failed")
        if Effect.COMPLETE_LEASE in want:
            await self._quiet(self.ports.leases.complete(want[Effect.COMPLETE_LEASE]), "lease_complete_failed")
        if Effect.FORGET in want:
            self._forget([(i, s) for i, s in steps if Effect.FORGET in s.effects])

    def _expire_recent(self, now: float) -> None:
        """Forget finished ids older than RECENT_TTL (oldest first: `recent` is in time
        order), and the oldest beyond RECENT_MAX, so that it holds only the last two
        minutes however long the process runs."""
        recent = self.recent
        while recent:
            oldest, at = next(iter(recent.items()))
            if now - at < RECENT_TTL and len(recent) <= RECENT_MAX:
                break
            del recent[oldest]

    async def _quiet(self, aw: Any, what: str) -> None:
        try:
            await aw
        except Exception as exc:
            _log.warning(what, error=str(exc))

    def _forget(self, steps: Sequence[tuple[str, lc.Step]]) -> None:
        now = trio.current_time()
        for i, step in steps:
            self.records.pop(i, None)
            self.works.pop(i, None)
            self.claimed_at.pop(i, None)
            self.computed_at.pop(i, None)
            if step.record.phase in (Phase.REPORTED, Phase.ABANDONED):
                self.recent[i] = now
                self.recent.move_to_end(i)
        self._expire_recent(now)
        self.ports.metrics.in_flight.set(len(self.records))
        self._publish_outbox()
        if len(self.records) <= self.capacity // 2:
            self.room.set()

    def _publish_outbox(self) -> None:
        self.ports.metrics.outbox_size.set(self.outbox_size)
        self.ports.metrics.outbox_oldest.set(self.oldest_result_age())

    # -- whole moves the stages share -------------------------------------------------------
    async def drop(self, ids: Sequence[str]) -> None:
        """Let go of tasks that were never claimed (not admitted, backend down, stopping)."""
        ids = [i for i in ids if self.phase(i) in (Phase.SEEN, Phase.RESERVED)]
        charges = {i: self.records[i].charges for i in ids}
        await self.perform(self.fire(ids, Event.NOT_ADMITTED), charges=charges)

    async def move(self, ids: Sequence[str], event: Event, **kw: Any) -> None:
        """Fire `event` for `ids` and perform its bookkeeping (refunds use the charges held)."""
        ids = [i for i in ids if i in self.records]
        charges = {i: self.records[i].charges for i in ids}
        await self.perform(self.fire(ids, event, **kw), charges=charges)

    async def release(self, ids: Sequence[str], reason: str, *, event: Event = Event.RELEASE) -> int:
        """Hand claims back (PATCH pending) for tasks that hold no result. Returns how many
        the API took back; the others keep their journal row for the next start. A task
        whose claim PATCH got no answer (CLAIMING, or CLAIM_UNKNOWN) keeps its row even when
        the release is taken: the API may still apply that claim after it (a slow request
        is carried out though its client left), and the next start hands it back again."""
        uncertain = {i for i in ids if self.phase(i) is Phase.CLAIMING}
        ids = [i for i in ids if i in self.records and event in lc.allowed(self.records[i].phase)]
        if not ids:
            return 0
        charges = {i: self.records[i].charges for i in ids}
        steps = self.fire(ids, event)
        await self.perform(steps, charges=charges)
        ok: list[str] = []
        failed: list[str] = []

        async def one(task_id: str) -> None:
            try:
                await self.ports.api.patch(task_id, "pending")
            except ApiError as exc:
                _log.warning("release_failed", task_id=task_id, error=str(exc))
                failed.append(task_id)
            else:
                ok.append(task_id)

        try:
            async with trio.open_nursery() as n:
                for i in ids:
                    n.start_soon(one, i)
        finally:
            cut = [i for i in ids if i not in ok and i not in failed]  # cancelled mid-PATCH
            sure = [i for i in ok if i not in uncertain]
            kept = [i for i in ok if i in uncertain] + failed + cut
            with trio.CancelScope(shield=True):
                await self.perform(self.fire(sure, Event.RELEASE_OK) + self.fire(kept, Event.RELEASE_FAILED))
            self.left.update(failed + cut)
        self.ports.metrics.released.labels(reason).inc(len(ok))
        _log.info("claims_released", count=len(ok), release_failed=len(ids) - len(ok), reason=reason)
        return len(ok)

    async def abandon(self, ids: Sequence[str]) -> None:
        """Another replica may own these now: forget them without reporting."""
        steps = self.fire(ids, Event.LEASE_LOST)
        await self.perform(steps)
        self.ports.metrics.released.labels("lease_lost").inc(len(steps))
