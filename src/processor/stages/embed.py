"""Batch claimed tasks (pure), call the backend under its breaker and retry policy, check
the vectors (pure), write the outcomes to the outbox, hand them to the reporter.

Errors are sorted by whom they concern:
* one task's own input (400): split the batch to find it, fail only that task;
* the model (404 / not available): fail that model's tasks with the message, or send them
  to FALLBACK_MODELS when the user opted in (logged and counted every time);
* the whole backend (bad key, quota, unreachable after retries): never fail the tasks;
  release their claims, open the breaker, stop claiming for that backend;
* transient (5xx, timeouts): retry with backoff; a batch that times out is split first; a
  task that keeps failing is failed after MAX_TASK_ATTEMPTS with the last reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import trio

from processor.effects.backends.base import EmbedError, estimate_tokens
from processor.pure import batching, vectors
from processor.pure import retry as rtp
from processor.pure.breaker import Outcome as BreakerOutcome
from processor.pure.faults import Fault
from processor.pure.tasks import Backend, Task
from processor.runtime import Outcome, Runtime

OPERATION_DEADLINE = 300.0


async def batcher(rt: Runtime, claimed: trio.MemoryReceiveChannel[Task], batches: trio.MemorySendChannel[batching.Batch[Task]]) -> None:
    """Group by (backend, model); a batch closes when full or BATCH_MAX_WAIT_MS after its
    first task arrived."""
    state: batching.Batcher[Task] = batching.Batcher(rt.s.max_batch_size, rt.s.batch_max_wait_ms / 1000.0)
    async with claimed, batches:
        while True:
            deadline = batching.next_deadline(state)
            task = None
            ended = False
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                try:
                    task = await claimed.receive()
                except trio.EndOfChannel:
                    ended = True
            now = trio.current_time()
            ready: list[batching.Batch[Task]] = []
            if task is not None:
                state, ready = batching.add(state, (task.backend, task.model), task, now)
            state, due = batching.due(state, now)
            ready += due
            if ended or rt.stopping.is_set():
                state, rest = batching.flush(state)
                ready += rest
            for b in ready:
                rt.metrics.channel_depth.labels("batches").set(batches.statistics().current_buffer_used)
                await batches.send(b)
            if ended:
                break


async def embed_worker(rt: Runtime, batches: trio.MemoryReceiveChannel[batching.Batch[Task]], results: trio.MemorySendChannel[list[Outcome]]) -> None:
    async with batches, results:
        async for batch in batches:
            backend, model = cast(tuple[Backend, str], batch.key)
            if rt.stopping.is_set():
                # shutting down: batches already at a backend finish; queued ones go back
                await rt.release([t.id for t in batch.items], reason="shutdown")
                continue
            await embed_batch(rt, backend, model, list(batch.items), results)


async def embed_batch(rt: Runtime, backend: Backend, model: str, tasks: list[Task], results: trio.MemorySendChannel[list[Outcome]]) -> None:
    adapter = rt.backends[backend]
    limits = adapter.limits(model)
    too_long: list[Task] = []
    if limits.max_input_tokens is not None and not rt.s.openai_truncate:
        too_long = [t for t in tasks if estimate_tokens(t.text) > limits.max_input_tokens]
        tasks = [t for t in tasks if estimate_tokens(t.text) <= limits.max_input_tokens]
    if too_long:
        await deliver(rt, results, [
            Outcome(t.id, "failed", None, f"text is too long for {model} (about {estimate_tokens(t.text)} tokens; the limit is {limits.max_input_tokens})", t.created_at)
            for t in too_long
        ])
    chunks = batching.chunk(
        tasks, max_items=limits.max_items, max_weight=float(limits.max_tokens or 10**12),
        weight=lambda t: float(estimate_tokens(t.text)),
    )
    for chunk in chunks:
        await embed_chunk(rt, backend, model, chunk, results, trio.current_time())


def _texts(rt: Runtime, backend: Backend, model: str, tasks: Sequence[Task]) -> list[str]:
    if backend is Backend.OPENAI and rt.s.openai_truncate:
        limit = rt.backends[backend].limits(model).max_input_tokens or 8192
        return [truncate_to_tokens(t.text, limit) for t in tasks]
    return [t.text for t in tasks]


def truncate_to_tokens(text: str, tokens: int) -> str:
    """Cut `text` so that its (conservative) token estimate fits `tokens`."""
    if estimate_tokens(text) <= tokens:
        return text
    return text.encode("utf-8")[: 3 * (tokens - 1)].decode("utf-8", errors="ignore")


async def embed_chunk(
    rt: Runtime, backend: Backend, model: str, tasks: list[Task], results: trio.MemorySendChannel[list[Outcome]], started: float, attempt: int = 0
) -> None:
    adapter = rt.backends[backend]
    guard = rt.backend_guards[backend]
    log = rt.log.bind(component="embed", backend=backend.value, model=model)
    while True:
        if not guard.allow():
            await rt.release([t.id for t in tasks], reason="backend_unavailable")
            return
        t0 = trio.current_time()
        try:
            result = await adapter.embed(model, _texts(rt, backend, model, tasks))
        except EmbedError as exc:
            rt.metrics.backend_requests.labels(backend.value, model, exc.kind.value).inc()
            kind = exc.fault
            # Interim mapping of the adapters' faults onto this stage's handling (the
            # policy table replaces it): configuration faults take the backend down.
            if kind is Fault.INPUT:
                guard.record(BreakerOutcome.IGNORED)
                if len(tasks) == 1:
                    await deliver(rt, results, [Outcome(tasks[0].id, "failed", None, str(exc), tasks[0].created_at)])
                    return
                left, right = batching.halves(tasks)
                log.info("batch_split", reason="input_rejected", size=len(tasks))
                await embed_chunk(rt, backend, model, left, results, started, attempt)
                await embed_chunk(rt, backend, model, right, results, started, attempt)
                return
            if kind is Fault.MODEL_MISSING:
                guard.record(BreakerOutcome.IGNORED)
                fallback = rt.s.fallback_models.get(model) if backend is Backend.OLLAMA and Backend.OPENAI in rt.backends else None
                if fallback:
                    await fall_back(rt, model, fallback, tasks, results, str(exc))
                    return
                await deliver(rt, results, [Outcome(t.id, "failed", None, str(exc), t.created_at) for t in tasks])
                return
            if kind in (Fault.AUTH, Fault.QUOTA, Fault.PARAMETER, Fault.DIMENSION):
                guard.release_probe()
                guard.force_open()
                if kind is Fault.QUOTA:
                    rt.quota_exhausted[backend] = str(exc)
                    rt.metrics.quota_exhausted.labels(backend.value).set(1)
                    log.critical("backend_quota_exhausted", error=str(exc), action="releasing claims; not ready until a probe succeeds")
                else:
                    rt.backend_down[backend] = str(exc)
                    log.error("backend_unusable", error=str(exc), action="releasing claims; not ready until a probe succeeds")
                await rt.release([t.id for t in tasks], reason="backend_down")
                return
            if kind is Fault.RATE_LIMITED:
                guard.record(BreakerOutcome.IGNORED)
                delay = exc.retry_after if exc.retry_after is not None else rtp.backoff(rtp.RetryPolicy(), attempt, guard.draw())
                rt.metrics.retries.labels(backend.value, "rate_limited").inc()
                log.info("backend_rate_limited", retry_in=delay)
                if trio.current_time() - started + delay > OPERATION_DEADLINE:
                    await _transient_give_up(rt, backend, model, tasks, results, str(exc))
                    return
                await trio.sleep(delay)
                attempt += 1
                continue
            # TIMEOUT, BUSY, SERVER, UNREACHABLE, MALFORMED: transient
            guard.record(BreakerOutcome.FAILURE)
            if kind is Fault.TIMEOUT and len(tasks) > 1:
                left, right = batching.halves(tasks)
                log.info("batch_split", reason="timeout", size=len(tasks))
                await embed_chunk(rt, backend, model, left, results, started, attempt + 1)
                await embed_chunk(rt, backend, model, right, results, started, attempt + 1)
                return
            policy = rtp.RetryPolicy(
                max_retries=rt.s.ollama_max_retries if backend is Backend.OLLAMA else rt.s.max_retries,
                factor=rt.s.retry_backoff_factor, cap=rt.s.retry_max_delay_seconds, deadline=OPERATION_DEADLINE,
            )
            decision = guard.retry_decision(policy, attempt, trio.current_time() - started, rtp.ErrorKind.RETRYABLE, None, kind.value)
            if isinstance(decision, rtp.GiveUp):
                log.warning("backend_gave_up", error=str(exc), why=decision.reason, size=len(tasks))
                if kind is Fault.UNREACHABLE:
                    # unreachable after retries concerns the backend, never the tasks
                    guard.force_open()
                    rt.backend_down[backend] = str(exc)
                    await rt.release([t.id for t in tasks], reason="backend_unreachable")
                    return
                if kind is Fault.BUSY:
                    # a busy server is never a task's defect: back to pending, units spent
                    await rt.release([t.id for t in tasks], reason="backend_busy", refund=False)
                    return
                await _transient_give_up(rt, backend, model, tasks, results, f"{exc} ({decision.reason})")
                return
            log.info("backend_retry", error=str(exc), attempt=attempt + 1, retry_in=round(decision.delay, 3))
            await trio.sleep(decision.delay)
            attempt += 1
            continue
        guard.record(BreakerOutcome.SUCCESS)
        rt.quota_exhausted.pop(backend, None)
        rt.backend_down.pop(backend, None)
        rt.metrics.quota_exhausted.labels(backend.value).set(0)
        rt.metrics.backend_requests.labels(backend.value, model, "success").inc()
        rt.metrics.batch_size.labels(backend.value).observe(len(tasks))
        log.debug("batch_embedded", size=len(tasks), seconds=round(trio.current_time() - t0, 4))
        await deliver(rt, results, check(rt, backend, model, tasks, result.vectors))
        return


def check(rt: Runtime, backend: Backend, model: str, tasks: Sequence[Task], raw_vectors: Sequence[object]) -> list[Outcome]:
    adapter = rt.backends[backend]
    verdicts, dim = vectors.check_batch(raw_vectors, len(tasks), adapter.expected_dim(model))
    if dim is not None:
        adapter.learn_dim(model, dim)
    out = []
    for t, v in zip(tasks, verdicts, strict=True):
        if isinstance(v, vectors.VectorOk):
            out.append(Outcome(t.id, "succeeded", v.vector, None, t.created_at))
        else:
            out.append(Outcome(t.id, "failed", None, f"{backend.value}/{model}: {v.reason}", t.created_at))
    return out


async def fall_back(rt: Runtime, model: str, fallback: str, tasks: list[Task], results: trio.MemorySendChannel[list[Outcome]], why: str) -> None:
    rt.metrics.fallbacks.labels(model, fallback).inc(len(tasks))
    rt.log.warning("model_fallback", model=model, fallback=fallback, count=len(tasks), why=why,
                   note="vectors of the fallback model live in a different space")
    moved = [Task(t.id, t.text, fallback, Backend.OPENAI, t.created_at) for t in tasks]
    await embed_chunk(rt, Backend.OPENAI, fallback, moved, results, trio.current_time())


async def _transient_give_up(rt: Runtime, backend: Backend, model: str, tasks: list[Task], results: trio.MemorySendChannel[list[Outcome]], reason: str) -> None:
    """Retries ran out: fail tasks past MAX_TASK_ATTEMPTS, release the rest for later."""
    failed: list[Task] = []
    again: list[Task] = []
    for t in tasks:
        n = rt.attempts.get(t.id, 0) + 1
        rt.attempts[t.id] = n
        (failed if n >= rt.s.max_task_attempts else again).append(t)
    if failed:
        await deliver(rt, results, [Outcome(t.id, "failed", None, f"gave up after {rt.s.max_task_attempts} attempts: {reason}", t.created_at) for t in failed])
    if again:
        # they reached the backend (which may have done the work): their units stay spent
        await rt.release([t.id for t in again], reason="transient_failure", refund=False)


async def deliver(rt: Runtime, results: trio.MemorySendChannel[list[Outcome]], outcomes: list[Outcome]) -> None:
    """Outbox first (one transaction per batch), then the reporter."""
    if not outcomes:
        return
    lost = rt.leases.lost() & {o.task_id for o in outcomes}
    if lost:
        # another replica may own these now: abandon them without reporting
        outcomes = [o for o in outcomes if o.task_id not in lost]
        await rt.journal.remove_claims(list(lost))
        await rt.leases.release(list(lost))
        for tid in lost:
            rt.unhold(tid, finished=False)
        rt.metrics.released.labels("lease_lost").inc(len(lost))
    if not outcomes:
        return
    await rt.store_outcomes(outcomes)
    rt.metrics.stage_tasks.labels("computed").inc(len(outcomes))
    rt.metrics.channel_depth.labels("results").set(results.statistics().current_buffer_used)
    await results.send(outcomes)
