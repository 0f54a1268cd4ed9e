"""Group claimed tasks by their kind's key (pure), call the backend under its breaker,
check the answer, and hand the outcomes to the reporter (outbox first).

What to do after an error is not decided here: `processor.pure.policy` maps the adapter's
(dependency, fault) to an action, and `carry_out` performs it. Retries go through the one
retry primitive with the backend's budget (deposited on every call, spent on every retry).

Embedding calls are sized by the backend's measured speed (`processor.pure.adaptive`,
carried out by `processor.effects.adaptive`, one limiter per (backend, model)): a batch
is cut into requests when a request slot is granted, as large as the limiter allows
then; each request carries the limiter's timeout, and is bounded here too (`backstop`)
whatever the adapter does with it. The slot is held only for the call itself: back-off
sleeps, splits, outbox writes and releases happen outside it. At shutdown a request that
has not got its slot yet is not sent: its tasks are handed back.

The batcher's port is `BatchPorts` (the task kinds' group keys, metrics, the batch limits,
the lifecycle's `stopping`); the workers' is `EmbedPorts`: the book, the backend board
(adapters, breakers, adaptive limits), the task kinds and the adapters they call
(`KindPorts`), metrics, the retry schedule, the journal (attempt counts), the budget
stage's port, the report stage's `deliver`, and the lifecycle's `stopping`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import attrs
import trio

from processor.board import BackendBoard
from processor.book import Book
from processor.effects.adaptive import AdaptiveLimiter, Slot
from processor.effects.logs import get_logger
from processor.effects.metrics import Metrics
from processor.effects.retrying import retrying
from processor.effects.store import JournalStore
from processor.kinds.base import Computed, KindPorts, TaskKind, Work
from processor.pure import batching, policy
from processor.pure.breaker import Outcome as BreakerOutcome
from processor.pure.faults import Dependency, DependencyError, Fault
from processor.pure.lifecycle import Event, Outcome
from processor.pure.policy import Action
from processor.pure.tasks import Backend
from processor.runtime import RetryConfig
from processor.stages import budget
from processor.stages.report import Deliver

OPERATION_DEADLINE = 300.0
BACKSTOP_MIN = 10.0  # seconds: the least a call may outlive the timeout it was given


@attrs.frozen
class BatchPorts:
    """What the batcher touches."""

    kinds: Mapping[str, TaskKind]
    metrics: Metrics
    stopping: trio.Event
    max_batch_size: int = 64
    batch_max_wait_ms: int = 50


@attrs.frozen
class EmbedPorts:
    """What the compute workers touch."""

    book: Book
    board: BackendBoard
    kinds: Mapping[str, TaskKind]
    ports: KindPorts  # the adapters the kinds call
    metrics: Metrics
    retry: RetryConfig
    journal: JournalStore
    budgets: budget.Budgets
    deliver: Deliver
    stopping: trio.Event
    max_task_attempts: int = 5
    fallback_models: Mapping[str, str] = attrs.field(factory=dict)


async def batcher(p: BatchPorts, claimed: trio.MemoryReceiveChannel[Work], batches: trio.MemorySendChannel[batching.Batch[Work]]) -> None:
    """Group by the kind's key; a batch closes when full or BATCH_MAX_WAIT_MS after its
    first task arrived."""
    state: batching.Batcher[Work] = batching.Batcher(p.max_batch_size, p.batch_max_wait_ms / 1000.0)
    async with claimed, batches:
        while True:
            deadline = batching.next_deadline(state)
            work = None
            ended = False
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                try:
                    work = await claimed.receive()
                except trio.EndOfChannel:
                    ended = True
            now = trio.current_time()
            ready: list[batching.Batch[Work]] = []
            if work is not None:
                state, ready = batching.add(state, _key(p, work), work, now)
            state, due = batching.due(state, now)
            ready += due
            if ended or p.stopping.is_set():
                state, rest = batching.flush(state)
                ready += rest
            for b in ready:
                p.metrics.channel_depth.labels("batches").set(batches.statistics().current_buffer_used)
                await batches.send(b)
            if ended:
                break


def _key(p: BatchPorts, work: Work) -> Hashable:
    return p.kinds[work.type].group_key(work)


async def embed_worker(p: EmbedPorts, batches: trio.MemoryReceiveChannel[batching.Batch[Work]], results: trio.MemorySendChannel[list[str]]) -> None:
    async with batches, results:
        async for batch in batches:
            if p.stopping.is_set():
                # shutting down: batches already at a backend finish; queued ones go back
                await p.book.release([w.id for w in batch.items], "shutdown")
                continue
            await compute_batch(p, list(batch.items), results)


async def compute_batch(p: EmbedPorts, works: list[Work], results: trio.MemorySendChannel[list[str]]) -> None:
    kind = p.kinds[works[0].type]
    too_long = getattr(kind, "too_long", None)
    if too_long is not None:
        defects = {w.id: d for w in works if (d := too_long(w, p.ports)) is not None}
        if defects:
            await send(p, results, {i: Outcome.failure(d.detail) for i, d in defects.items()})
            works = [w for w in works if w.id not in defects]
    if not works:
        return
    await compute_sized(p, kind, works, results)


async def compute_sized(p: EmbedPorts, kind: TaskKind, works: list[Work], results: trio.MemorySendChannel[list[str]]) -> None:
    """Cut `works` (one group key) into backend calls: the kind's `max_group`, and for an
    adaptively sized kind what the limiter allows when each request's slot is granted."""
    limit = max(1, kind.max_group(works[0], p.ports))
    lim = limiter_for(p, kind, works[0], limit)
    if lim is None:
        for i in range(0, len(works), limit):
            await compute_group(p, kind, works[i : i + limit], results)
        return
    remaining = works
    while remaining:
        slot = await _slot_unless_stopping(p, lim)
        if slot is None:  # shutting down: what has not gone out goes back
            await p.book.release([w.id for w in remaining], "shutdown")
            return
        try:
            chunk, remaining = slot.take(remaining, size=_chars)
            if len(chunk) > limit:
                chunk, remaining = chunk[:limit], chunk[limit:] + remaining
            await compute_group(p, kind, chunk, results, slot=slot)
        finally:
            slot.finish()  # not used (the breaker refused the group): given back, nothing recorded


def limiter_for(p: EmbedPorts, kind: TaskKind, work: Work, limit: int) -> AdaptiveLimiter | None:
    """The adaptive limiter of the work's (backend, model); None for kinds it does not size
    (chat calls are one task each, bounded by their own timeouts)."""
    limits = p.board.adaptive
    if limits is None or kind.dependency is not Dependency.EMBEDDING:
        return None
    return limits.get(work.backend, work.model, max_items=limit)


def _chars(w: Work) -> int:
    return len(w.text)


async def _slot_unless_stopping(p: EmbedPorts, lim: AdaptiveLimiter) -> Slot | None:
    """A granted request slot, or None once the daemon is stopping (the wait ends then)."""
    if p.stopping.is_set():
        return None
    got: Slot | None = None
    async with trio.open_nursery() as n:
        async def stop() -> None:
            await p.stopping.wait()
            n.cancel_scope.cancel()

        n.start_soon(stop)
        got = await lim.acquire()
        n.cancel_scope.cancel()
    if got is not None and p.stopping.is_set():
        got.finish()
        return None
    return got


def backstop(lim: AdaptiveLimiter, timeout: float) -> float:
    """How long a call given `timeout` may take before the stage gives up on it: adapters
    bound their own requests, but a body that drips, a hung fake or a plug-in may not; and
    a call may have legitimate work before its request (`extra_time`: Ollama pulling the
    model, OLLAMA_MODEL_DOWNLOAD_TIMEOUT)."""
    return 2 * timeout + BACKSTOP_MIN + lim.extra_time


async def _call(p: EmbedPorts, kind: TaskKind, works: list[Work], lim: AdaptiveLimiter | None,
                held: list[Slot]) -> Sequence[Computed | DependencyError]:
    """One backend call; under a request slot (the one handed over in `held`, else a new
    one) when the kind is sized adaptively."""
    if lim is None:
        return await kind.compute(p.ports, works)
    slot = held.pop() if held else await lim.acquire()
    try:
        timeout = slot.start(len(works), sum(_chars(w) for w in works))
        backend, model = works[0].backend, works[0].model
        with trio.move_on_after(backstop(lim, timeout)) as scope:
            answers = await kind.compute(p.ports, works, timeout=timeout)
        if scope.cancelled_caught:
            raise DependencyError(f"{backend.value}/{model}: no answer within {backstop(lim, timeout):g}s "
                                  f"(the request's timeout was {timeout:g}s)", Fault.TIMEOUT)
    except BaseException as exc:
        slot.finish(exc)
        raise
    slot.finish()
    return answers


async def compute_group(p: EmbedPorts, kind: TaskKind, works: list[Work], results: trio.MemorySendChannel[list[str]],
                        *, slot: Slot | None = None) -> None:
    """One group's call with its retries. `slot`: a request slot already granted for it
    (its first attempt uses it; every later one waits for its own)."""
    backend, model = works[0].backend, works[0].model
    guard = p.board.guards[backend]
    log = get_logger("daemon").bind(component="compute", backend=backend.value, model=model, type=works[0].type)
    if not guard.allow():
        await p.book.release([w.id for w in works], "backend_unavailable")
        return
    lim = limiter_for(p, kind, works[0], max(1, kind.max_group(works[0], p.ports)))
    held = [slot] if slot is not None and slot.held and not slot.used else []
    started = trio.current_time()
    await p.book.move([w.id for w in works if p.book.phase(w.id) is not None], Event.DISPATCH)
    on = _Verdict(p, kind, works, adaptive=lim is not None, log=log)

    try:
        async for attempt in retrying(name=backend.value, on=on, attempts=_attempts(p, backend),
                                      timeout=OPERATION_DEADLINE, factor=p.retry.factor,
                                      cap=p.retry.cap, budget=p.board.budgets[backend], rng=p.retry.rng):
            with attempt:
                answers = await _call(p, kind, works, lim, held)
    except DependencyError as exc:
        p.metrics.backend_requests.labels(backend.value, model, exc.fault.value).inc()
        await carry_out(p, kind, works, exc, results, started)
        return
    guard.record(BreakerOutcome.SUCCESS)
    if p.ports.budget is not None:  # token or spend budgets: the real usage replaces the reservations
        await budget.settle_call(p.budgets, works, answers, retried=on.billed)
    if p.board.succeeded(backend, model):
        p.metrics.quota_exhausted.labels(backend.value).set(0)
    p.metrics.backend_requests.labels(backend.value, model, "success").inc()
    p.metrics.batch_size.labels(backend.value).observe(len(works))
    done: dict[str, Outcome] = {}
    bad: list[tuple[Work, DependencyError]] = []
    for w, a in zip(works, answers, strict=True):
        if isinstance(a, Computed):
            done[w.id] = Outcome.success(a.result)
        else:
            bad.append((w, a))
    await send(p, results, done)
    for w, err in bad:  # one task's answer was unusable: that task alone, by the same table
        await carry_out(p, kind, [w], err, results, started)


class _Verdict:
    """`on` for one group's retries: the policy's verdict on each error, the breaker fed.

    `billed`: an attempt that failed may have been billed (no answer, a 5xx), so the
    group's budget reservations stay. A busy answer under the adaptive limiter is retried
    after a paced wait (no retry budget spent): the limiter, which halves requests in
    flight for a busy server, is what slows down for it."""

    def __init__(self, p: EmbedPorts, kind: TaskKind, works: list[Work], *, adaptive: bool, log: Any) -> None:
        self.p, self.kind, self.works, self.adaptive, self.log = p, kind, works, adaptive, log
        self.guard = p.board.guards[works[0].backend]
        self.billed = False
        self.busy = 0

    def __call__(self, exc: BaseException) -> bool | float:
        if not isinstance(exc, DependencyError):
            return False
        p, guard, backend = self.p, self.guard, self.works[0].backend
        self.billed = self.billed or exc.fault not in budget.NOT_BILLED
        r = policy.rule(self.kind.dependency, exc.fault)
        if r.action is Action.SPLIT and len(self.works) > 1:
            # maybe one input's fault (a healthy server with a poison input): the halves will
            # tell; only a lone task's failure counts against the backend
            guard.record(BreakerOutcome.IGNORED)
            return False
        guard.record(r.breaker)
        if r.action is Action.PACE:
            p.metrics.retries.labels(backend.value, exc.fault.value).inc()
            return exc.retry_after if exc.retry_after is not None else True
        if r.action is Action.RETRY and guard.allow():
            p.metrics.retries.labels(backend.value, exc.fault.value).inc()
            self.log.info("backend_retry", fault=exc.fault.value, error=str(exc))
            if exc.fault is Fault.BUSY and self.adaptive:
                self.busy += 1
                return exc.retry_after if exc.retry_after is not None else p.retry.backoff(self.busy)
            return True
        return False


def _attempts(p: EmbedPorts, backend: Backend) -> int:
    return 1 + (p.retry.ollama_max_retries if backend is Backend.OLLAMA else p.retry.max_retries)


async def carry_out(p: EmbedPorts, kind: TaskKind, works: list[Work], exc: DependencyError,
                    results: trio.MemorySendChannel[list[str]], started: float) -> None:
    """Perform the policy's action once retrying is over (or at once, when it says so)."""
    r = policy.rule(kind.dependency, exc.fault)
    action = r.action if r.action not in (Action.RETRY, Action.PACE) else policy.after_retries(r, group_size=len(works))
    if action is Action.SPLIT:
        action = Action.SPLIT if len(works) > 1 else policy.after_retries(r, group_size=1)
    backend, model = works[0].backend, works[0].model
    log = get_logger("daemon").bind(component="compute", backend=backend.value, model=model)
    ids = [w.id for w in works]
    if action is Action.SPLIT:
        left, right = batching.halves(works)
        log.info("batch_split", fault=exc.fault.value, size=len(works))
        # each half as the limiter sizes requests now (after a timeout: smaller still)
        await compute_sized(p, kind, list(left), results)
        await compute_sized(p, kind, list(right), results)
    elif action is Action.FAIL_TASK:
        await send(p, results, {i: Outcome.failure(str(exc)[:500]) for i in ids})
    elif action is Action.BACKEND_UNUSABLE:
        guard = p.board.guards[backend]
        guard.release_probe()
        guard.force_open()
        if exc.fault is Fault.QUOTA:
            p.board.quota[backend] = str(exc)
            p.metrics.quota_exhausted.labels(backend.value).set(1)
            log.critical("backend_quota_exhausted", error=str(exc), action="releasing claims; not ready until a probe succeeds")
        else:
            p.board.down[backend] = str(exc)
            log.error("backend_unusable", fault=exc.fault.value, error=str(exc),
                      action="releasing claims; not ready until a probe succeeds; no task failed")
        await p.book.release(ids, "backend_down")
    elif action is Action.MODEL_UNUSABLE:
        fallback = p.fallback_models.get(model) if backend is Backend.OLLAMA and Backend.OPENAI in p.board.adapters else None
        if fallback and works[0].type == "text_embedding":
            await fall_back(p, kind, model, fallback, works, results, str(exc))
            return
        p.metrics.unservable.labels(p.board.mark_unservable(model, str(exc))).inc(len(ids))
        log.error("model_unservable", error=str(exc), action="tasks left pending; another worker or a setting can serve them")
        await p.book.release(ids, "model_unservable")
    elif action is Action.RETRY_LATER:
        await retry_later(p, works, exc, results, counts=r.counts_attempt and p.board.last_success.get(backend, -1.0) > started)
    else:  # RELEASE and anything else: hand back, never the tasks' fault
        log.warning("backend_gave_up", fault=exc.fault.value, error=str(exc), size=len(works))
        await p.book.release(ids, "backend_unavailable" if exc.fault in (Fault.UNREACHABLE, Fault.BUSY) else "transient_failure")


async def retry_later(p: EmbedPorts, works: Sequence[Work], exc: DependencyError,
                      results: trio.MemorySendChannel[list[str]], *, counts: bool) -> None:
    """Hand back after failures at the backend. When the backend answered others meanwhile,
    the failure counts against the task (persisted); past MAX_TASK_ATTEMPTS it is failed."""
    ids = [w.id for w in works]
    if not counts:
        await p.book.release(ids, "transient_failure")
        return
    try:
        seen = p.journal.attempts(ids)
    except Exception:
        seen = {}
    over = [i for i in ids if seen.get(i, 0) + 1 >= p.max_task_attempts]
    again = [i for i in ids if i not in over]
    if over:
        await p.journal.clear_attempts(over)
        reason = f"gave up after {p.max_task_attempts} attempts: {exc}"[:500]
        await send(p, results, {i: Outcome.failure(reason) for i in over})
    if again:
        await p.book.release(again, "transient_failure", event=Event.RETRY_LATER)


async def fall_back(p: EmbedPorts, kind: TaskKind, model: str, fallback: str, works: list[Work],
                    results: trio.MemorySendChannel[list[str]], why: str) -> None:
    p.metrics.fallbacks.labels(model, fallback).inc(len(works))
    get_logger("daemon").warning("model_fallback", model=model, fallback=fallback, count=len(works), why=why,
                   note="vectors of the fallback model live in a different space")
    moved = [Work(w.id, w.type, w.text, fallback, Backend.OPENAI, w.params, w.created_at, model) for w in works]
    for w in moved:
        p.book.works[w.id] = w
    await compute_group(p, kind, moved, results)


async def send(p: EmbedPorts, results: trio.MemorySendChannel[list[str]], outcomes: dict[str, Outcome]) -> None:
    """Outbox first (one transaction per batch), then the reporter."""
    if not outcomes:
        return
    ready = await p.deliver(outcomes)
    if ready:
        p.metrics.channel_depth.labels("results").set(results.statistics().current_buffer_used)
        await results.send(ready)
