"""Wire the adapters and stages into one Trio nursery, and run them until told to stop.

Lifetimes:
* services (health server, signal watcher) live as long as the process;
* the pipeline (poll -> claim -> batch -> embed -> report) lives until shutdown; its stages
  are connected by bounded memory channels, so a slow stage holds the one before it back.

Shutdown (SIGTERM/SIGINT or `Daemon.stop()`): /ready turns 503 at once; polling and
claiming stop; in-flight batches get SHUTDOWN_GRACE_SECONDS to finish and report; what is
unfinished then is cancelled and its claims released inside a shielded scope bounded to
3 s; exit 0. A second signal cuts the grace to zero.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import trio

import processor
from processor.config import Settings, StateBackend
from processor.effects.adaptive import AdaptiveLimits
from processor.effects.api import TaskApi
from processor.effects.asgi import serve_asgi
from processor.effects.auth import TokenProvider
from processor.effects.backends.base import EmbeddingBackend
from processor.effects.guard import Guard
from processor.effects.health import HealthApp
from processor.effects.http import build_client
from processor.effects.leases import Leases, NoLeases
from processor.effects.limiter import Limiter, build_limiter, tier_views
from processor.effects.logs import get_logger
from processor.effects.memory import trim_memory
from processor.effects.metrics import Metrics
from processor.effects.signals import SignalSource
from processor.effects.store import JournalStore
from processor.kinds import registry
from processor.kinds.base import Work
from processor.pure import lifecycle, readiness
from processor.pure.lifecycle import Phase
from processor.pure.tasks import Backend
from processor.runtime import RELEASE_TIMEOUT
from processor.stages import claim, embed, intake, recovery, report
from processor.wiring import (
    Adapters,
    Pipeline,
    breaker_config,
    build_backends,
    build_chat_ports,
    build_pipeline,
    limiter_configs,
    routing_for,
    stage_config,
    token_config,
)


class StartupError(Exception):
    """The daemon cannot start (a model cannot be made available, a store is unusable)."""


def _tiers(limiter: Limiter) -> list[dict[str, Any]]:
    return tier_views(limiter.usage())


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError inside `exc` (hypercorn raises binding errors from its own nursery)."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _os_error(inner)
            if found is not None:
                return found
    return None


@attrs.frozen
class HealthAt:
    """Where `/health`, `/ready` and `/metrics` are served (port 0: any free port)."""

    host: str
    port: int


class Settled(enum.Enum):
    """`Daemon(health=FROM_SETTINGS)`: at METRICS_HOST:METRICS_PORT."""

    FROM_SETTINGS = "from_settings"


FROM_SETTINGS = Settled.FROM_SETTINGS


@attrs.frozen
class Parts:
    """What a caller (tests, the Redis root) hands the daemon instead of the default build."""

    backends: dict[Backend, EmbeddingBackend] | None = None
    leases: Leases | None = None
    limiter: Limiter | None = None
    openai_limiter: Limiter | None = None
    redis_client: Any = None  # STATE_BACKEND=redis: shares the Wikidata cache and turn
    clock: Callable[[], float] = time.time
    rng: random.Random = attrs.field(factory=random.Random)


@attrs.define
class ShutdownControl:
    """The shutdown's state: requested, the grace left, and the scope a second signal cancels."""

    grace: float
    requested: trio.Event = attrs.field(factory=trio.Event)
    started: trio.Event = attrs.field(factory=trio.Event)
    shutting_down: bool = False
    work_scope: trio.CancelScope | None = None

    def stop(self, *, immediate: bool = False) -> None:
        if immediate:
            self.grace = 0.0
            if self.work_scope is not None:
                self.work_scope.cancel()
        self.requested.set()


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        backends: dict[Backend, EmbeddingBackend] | None = None,
        leases: Leases | None = None,
        limiter: Limiter | None = None,
        openai_limiter: Limiter | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        signals: SignalSource | None = None,
        health: HealthAt | Settled | None = FROM_SETTINGS,
        redis_client: Any = None,  # STATE_BACKEND=redis: shares the Wikidata cache and turn
    ) -> None:
        self.s = settings
        self.metrics = metrics or Metrics()
        self.metrics.ready.set_function(self._ready_value)  # computed at scrape time from the pure rule
        self.log = get_logger("daemon")
        self._parts = Parts(backends=backends, leases=leases, limiter=limiter, openai_limiter=openai_limiter,
                            redis_client=redis_client, clock=clock, rng=rng or random.Random())
        self._signals = signals  # None: no OS signals (the owner calls `stop`)
        self._health_at = HealthAt(settings.metrics_host, settings.metrics_port) if health is FROM_SETTINGS else health
        self.pipeline: Pipeline | None = None  # what `build_pipeline` made, once running
        self.health_url: str | None = None
        self.control = ShutdownControl(grace=settings.shutdown_grace_seconds)
        self._health_stop = trio.Event()

    @property
    def started(self) -> trio.Event:
        return self.control.started

    @property
    def shutting_down(self) -> bool:
        return self.control.shutting_down

    # -- control -------------------------------------------------------------------------
    def stop(self, *, immediate: bool = False) -> None:
        """Begin a graceful shutdown; `immediate` (a second signal) cuts the grace to zero."""
        self.control.stop(immediate=immediate)

    # -- health --------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        pipe = self.pipeline
        if pipe is None:
            return {"status": "starting", "version": processor.__version__}
        limiter_ok, limiter_err = pipe.admission.limiter.healthy
        return {
            "status": "stopping" if self.shutting_down else "ok",
            "version": processor.__version__,
            "mode": self.s.processing_mode.value,
            "token": {"obtained": pipe.tokens.has_token, "last_error": pipe.tokens.last_error},
            "breakers": {g.name: g.state.state.name.lower() for g in self._guards()},
            "rate_limits": _tiers(pipe.admission.limiter),
            "openai_rate_limits": _tiers(pipe.admission.openai_limiter),
            "state_store": {"writable": limiter_ok and pipe.journal.db.writable, "error": limiter_err or pipe.journal.db.last_error},
            "in_flight": len(pipe.book),
            "outbox_size": pipe.book.outbox_size,
            "quota_exhausted": {b.value: m for b, m in pipe.board.quota.items()},
            # models a backend cannot serve right now, and why (adapters that know it)
            "unavailable_models": {b.value: dict(u) for b, a in pipe.board.adapters.items() if (u := getattr(a, "unavailable", None))},
            "backends_unusable": {b.value: m for b, m in pipe.board.down.items()},
            "models_unservable": dict(pipe.board.unservable),
            # token / spend budgets: models whose tasks stay pending, per reason (no_price, too_big)
            "models_budget_refused": {k: dict(v) for k, v in pipe.board.budget_refused.items()},
            # per backend/model: what was measured and what is allowed now (requests, sizes)
            "adaptive": pipe.board.adaptive.snapshot() if pipe.board.adaptive is not None else {},
        }

    def _guards(self) -> list[Guard]:
        pipe = self.pipeline
        if pipe is None:
            return []
        return [pipe.api.guard, pipe.tokens.guard, *pipe.board.guards.values()]

    def facts(self) -> readiness.Facts:
        """What readiness is decided from (gathered here; decided by `pure.readiness`)."""
        pipe = self.pipeline
        if pipe is None:
            return readiness.Facts(started=False)
        last = pipe.api.last_success
        limiter_ok, err = pipe.admission.limiter.healthy
        backends = tuple(
            readiness.BackendFacts(
                b.value, breaker_open=pipe.board.guards[b].is_open, unusable=pipe.board.down.get(b),
                quota=pipe.board.quota.get(b), down=getattr(adapter, "down", None) or None,
            )
            for b, adapter in pipe.board.adapters.items()
        )
        return readiness.Facts(
            shutting_down=self.shutting_down, token=pipe.tokens.has_token, token_error=pipe.tokens.last_error,
            api_answered_ago=None if last is None else trio.current_time() - last,
            api_window=max(3 * self.s.polling_interval_seconds, 90.0), api_breaker_open=pipe.api.guard.is_open,
            backends=backends, store_ok=limiter_ok and pipe.journal.db.writable,
            store_error=err or pipe.journal.db.last_error, redis_error=getattr(self._parts.leases, "unavailable", None) or None,
        )

    def not_ready_reasons(self) -> list[str]:
        return readiness.reasons(self.facts())

    def _ready_value(self) -> float:
        try:
            return 0.0 if self.not_ready_reasons() else 1.0
        except RuntimeError:  # a scrape outside the Trio run (no clock): not ready
            return 0.0

    # -- run -------------------------------------------------------------------------------
    async def run(self) -> int:
        startup_error: StartupError | None = None
        async with trio.open_nursery() as services:
            try:
                if isinstance(self._health_at, HealthAt):
                    await self._serve_health(services, self._health_at)
                if self._signals is not None:
                    await services.start(self._signals.watch, self._on_signal)
                await self._run_pipeline()
            except StartupError as exc:
                startup_error = exc  # raised below, outside the nursery: no exception group
            finally:
                self._health_stop.set()
                services.cancel_scope.cancel()
        if startup_error is not None:
            raise startup_error
        return 0

    async def _serve_health(self, services: trio.Nursery, at: HealthAt) -> None:
        app = HealthApp(self.metrics.registry, self.health, self.not_ready_reasons)
        try:
            self.health_url = await services.start(
                lambda task_status: serve_asgi(app, at.host, at.port, shutdown=self._health_stop, task_status=task_status)
            )
        except (OSError, BaseExceptionGroup) as exc:
            err = _os_error(exc)
            if err is None:
                raise
            raise StartupError(
                f"cannot serve /health and /metrics on {at.host}:{at.port}: {err.strerror or err}"
                " — set METRICS_PORT (or METRICS_HOST)"
            ) from None
        self.log.info("health_server_started", url=self.health_url)

    def _on_signal(self, name: str, count: int) -> None:
        """SIGTERM/SIGINT (or `early`: before the receiver was in place): shut down; a
        second signal cuts the grace to zero."""
        action = "shutdown" if name == "early" or count == 1 else "immediate shutdown"
        self.log.info("signal_received", signal=name, action=action)
        self.stop(immediate=count > 1)

    async def _run_pipeline(self) -> None:
        s = self.s
        # One connection per concurrent API request, plus one for a pending-list stream
        # (httpcore checks every pooled connection on each request: spares cost CPU).
        http, lane = build_client(s.api_base_url, connections=s.api_concurrency + 1, timeout=s.request_timeout)
        # The token endpoint may live elsewhere (Ory Network): its own client, env proxies.
        token_http = httpx.AsyncClient(timeout=httpx.Timeout(s.request_timeout), trust_env=True)
        async with http, token_http:
            api_guard = Guard("task_api", attrs.evolve(breaker_config(s), base_wait=2.0, max_wait=60.0), metrics=self.metrics, rng=self._parts.rng)
            token_guard = Guard("token_endpoint", attrs.evolve(breaker_config(s), base_wait=2.0, max_wait=120.0), metrics=self.metrics, rng=self._parts.rng)
            tokens = TokenProvider(token_http, token_config(s), metrics=self.metrics, guard=token_guard)
            api = TaskApi(http, s.api_base_url, tokens, metrics=self.metrics, guard=api_guard, concurrency=s.api_concurrency, lane=lane)
            backends = self._parts.backends or build_backends(s, self.metrics)
            guards = {b: Guard(b.value, attrs.evolve(breaker_config(s), base_wait=5.0, max_wait=300.0), metrics=self.metrics, rng=self._parts.rng) for b in backends}
            try:
                journal = JournalStore(s.journal_path)
                limiter, openai_limiter = self._parts.limiter, self._parts.openai_limiter
                global_config, openai_config = limiter_configs(s)
                if limiter is None:
                    limiter = build_limiter(global_config, s.rate_limit_storage_path, metrics=self.metrics, clock=self._parts.clock)
                if openai_limiter is None:
                    openai_limiter = build_limiter(openai_config, s.rate_limit_storage_path.replace(".db", "") + "_openai.db",
                                                   metrics=None, clock=self._parts.clock)
            except Exception as exc:
                raise StartupError(str(exc)) from None
            leases = self._parts.leases or NoLeases()
            try:
                kinds = registry.load(s, getattr(s, "task_types", None) or None)
            except registry.RegistryError as exc:
                raise StartupError(str(exc)) from None
            chat, wikidata = build_chat_ports(s, self.metrics, kinds, redis_client=self._parts.redis_client)
            pipe = build_pipeline(
                stage_config(s),
                Adapters(backends=backends, guards=guards, limiter=limiter, openai_limiter=openai_limiter, leases=leases,
                         chat=chat, wikidata=wikidata),
                metrics=self.metrics, api=api, tokens=tokens, journal=journal, routing=routing_for(s), kinds=kinds,
                rng=self._parts.rng, wall=self._parts.clock, adaptive=AdaptiveLimits.from_settings(s),
            )
            self.pipeline = pipe
            # scrape-time gauges, bounded model label, series at zero
            self.metrics.watch(pipe, models=[*s.supported_models, s.default_model])
            try:
                for b, adapter in backends.items():
                    try:
                        await adapter.start()
                    except Exception as exc:
                        raise StartupError(f"{b.value} backend: {exc}") from None
                self.log.info("daemon_started", version=processor.__version__, mode=s.processing_mode.value,
                              concurrency=s.concurrency_limit, batch=s.max_batch_size, rate_limits=s.rate_limits.enabled())
                self.started.set()
                await self._pipeline(pipe)
            finally:
                with trio.move_on_after(RELEASE_TIMEOUT, shield=True):
                    for adapter in backends.values():
                        await adapter.aclose()
                    for closable in [*chat.values(), *([wikidata] if wikidata is not None else [])]:
                        await closable.aclose()
                journal.db.close()

    async def _pipeline(self, pipe: Pipeline) -> None:
        s = self.s
        st = pipe.stages
        pipeline_done = trio.Event()

        async def controller() -> None:
            await self.control.requested.wait()
            self.control.shutting_down = True
            pipe.stopping.set()
            self.log.info("shutdown_started", grace_seconds=self.control.grace, in_flight=len(pipe.book))
            with trio.move_on_after(self.control.grace):
                await pipeline_done.wait()
            if not pipeline_done.is_set():
                self.log.warning("shutdown_grace_expired", unfinished=len(pipe.book))
                work.cancel()

        intake_send, intake_recv = trio.open_memory_channel[Work](s.intake_capacity)
        claimed_send, claimed_recv = trio.open_memory_channel[Work](s.max_batch_size)
        batch_send, batch_recv = trio.open_memory_channel[Any](s.concurrency_limit)
        result_send, result_recv = trio.open_memory_channel[list[str]](s.concurrency_limit * 2)

        async with trio.open_nursery() as outer:
            outer.start_soon(controller)
            outer.start_soon(trim_memory, s.memory_trim_interval_seconds)  # freed heap pages back to the system
            for adapter in pipe.board.adapters.values():
                maintain = getattr(adapter, "maintain", None)  # e.g. Ollama: re-check unusable models
                if maintain is not None:
                    outer.start_soon(maintain)
            with trio.CancelScope() as work:
                self.control.work_scope = work
                if self.control.requested.is_set():
                    work.cancel()
                await recovery.recover(st.recovery)
                async with trio.open_nursery() as n:
                    n.start_soon(intake.poller, st.intake, intake_send, result_send.clone())
                    n.start_soon(claim.claimer, st.claim, intake_recv, claimed_send)
                    n.start_soon(embed.batcher, st.batch, claimed_recv, batch_send)
                    for _ in range(s.concurrency_limit):
                        n.start_soon(embed.embed_worker, st.embed, batch_recv.clone(), result_send.clone())
                    await batch_recv.aclose()
                    await result_send.aclose()
                    n.start_soon(report.reporter, st.report, result_recv)
                    n.start_soon(self._reclaim_loop, st.recovery)
                    n.start_soon(recovery.release_left, st.recovery)
                    # On shutdown the poller stops and closes the intake; every later stage
                    # ends when its input channel is closed and drained.
            pipeline_done.set()
            outer.cancel_scope.cancel()
        # Whatever did not finish: release claims without a result (shielded, bounded). A
        # release that does not get through keeps its journal row for the next start.
        book = pipe.book
        released = 0
        with trio.move_on_after(RELEASE_TIMEOUT, shield=True):
            await book.drop(book.in_phase(Phase.SEEN, Phase.RESERVED))
            leftover = [i for i, r in book.records.items() if lifecycle.may_release(r) or r.phase is Phase.RELEASING]
            if leftover:
                released = await book.release([i for i in leftover if lifecycle.may_release(book.records[i])], "shutdown")
        kept = len(book.in_phase(Phase.COMPUTED))
        self.log.info("shutdown_complete", released=released, release_failed=len(book) - kept, outbox_kept=kept)

    async def _reclaim_loop(self, ports: recovery.RecoveryPorts) -> None:
        s = self.s
        if s.state_backend is StateBackend.REDIS:
            interval, older = s.lease_ttl_seconds, s.lease_ttl_seconds
        else:
            interval, older = s.reclaim_interval_seconds, s.reclaim_after_seconds
        await recovery.reclaimer(ports, interval=interval, older_than=older)
