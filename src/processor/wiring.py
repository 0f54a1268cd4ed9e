"""The composition root: builds the daemon for the configured state backend and runs it.

SQLite (one worker) and Redis (replicas sharing quotas and leases) differ only in which
limiters and leases the daemon gets and which background tasks keep them alive; everything
else is the same `Daemon`. Adapters never import this module.

Signals: the daemon `run` starts gets `OS_SIGNALS` and holds a receiver while it runs.
Before and after that window (start-up, the last shielded clean-up), SIGTERM/SIGINT land in
`OS_SIGNALS.remember`, so a second signal during shutdown can never kill the process by the
default action; one that arrives before the receiver is in place starts the shutdown as
soon as it is.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from processor.board import Admission, BackendBoard
from processor.book import Book
from processor.config import Limits, Mode, Settings, StateBackend
from processor.effects.adaptive import AdaptiveLimits
from processor.effects.api import TaskApi
from processor.effects.auth import TokenConfig, TokenProvider
from processor.effects.backends.base import EmbeddingBackend
from processor.effects.backends.mock import MockBackend
from processor.effects.guard import Guard
from processor.effects.leases import Leases
from processor.effects.limiter import Limiter, LimiterConfig, limits_map
from processor.effects.metrics import Metrics
from processor.effects.signals import SHUTDOWN_SIGNALS, OsSignals
from processor.effects.store import JournalStore
from processor.kinds.base import KindPorts, TaskKind
from processor.pure.breaker import BreakerConfig
from processor.pure.faults import Dependency
from processor.pure.ratelimit import Period
from processor.pure.tasks import Backend, Routing
from processor.runtime import RetryConfig, StageConfig
from processor.stages.budget import BudgetPort, Budgets
from processor.stages.claim import ClaimPorts
from processor.stages.embed import BatchPorts, EmbedPorts
from processor.stages.intake import IntakePorts
from processor.stages.recovery import RecoveryPorts
from processor.stages.report import Reporter

if TYPE_CHECKING:
    from processor.daemon import Daemon
    from processor.effects.chat.base import ChatBackend
    from processor.effects.chat.metrics import ChatMetrics
    from processor.effects.wikidata import Enricher

# -- what each adapter gets of the settings ---------------------------------------------------


def token_config(s: Settings) -> TokenConfig:
    return TokenConfig(token_url=s.oauth2_token_url, client_id=s.oauth2_client_id, client_secret=s.oauth2_client_secret,
                       scope=s.oauth2_scope, auth_method=s.oauth2_auth_method)


def stage_config(s: Settings) -> StageConfig:
    return StageConfig(
        intake_capacity=s.intake_capacity, max_batch_size=s.max_batch_size, batch_max_wait_ms=s.batch_max_wait_ms,
        concurrency_limit=s.concurrency_limit, polling_interval_seconds=s.polling_interval_seconds,
        max_retries=s.max_retries, ollama_max_retries=s.ollama_max_retries, retry_backoff_factor=s.retry_backoff_factor,
        retry_max_delay_seconds=s.retry_max_delay_seconds, max_task_attempts=s.max_task_attempts,
        fallback_models=dict(s.fallback_models),
    )


def limiter_configs(s: Settings) -> tuple[LimiterConfig, LimiterConfig]:
    """The global limiter (task, token and spend tiers) and OpenAI's (task tiers); no tier
    at all with RATE_LIMIT_ENABLED=false."""
    def tiers(limits: Limits) -> dict[Period, int]:
        return limits_map(limits) if s.rate_limit_enabled else {}

    strategy, zone = s.rate_limit_strategy, s.rate_limit_timezone
    return (
        LimiterConfig("global", strategy, zone, tasks=tiers(s.rate_limits), tokens=tiers(s.token_limits),
                      spend=tiers(s.spend_limits), prices=s.model_prices),
        LimiterConfig("openai", strategy, zone, tasks=tiers(s.openai_rate_limits)),
    )


def breaker_config(s: Settings) -> BreakerConfig:
    return BreakerConfig(
        threshold=s.circuit_breaker_threshold,
        window=s.circuit_breaker_window if s.circuit_breaker_failure_rate > 0 else 0,
        rate_threshold=s.circuit_breaker_failure_rate or 1.0,
        min_calls=max(1, s.circuit_breaker_window // 2),
    )


def routing_for(s: Settings) -> Routing:
    mode = s.processing_mode
    local = frozenset(s.supported_models) if mode in (Mode.OLLAMA, Mode.HYBRID) else frozenset()
    return Routing(
        default_model=s.default_model,
        local_models=local,
        remote=mode in (Mode.OPENAI, Mode.HYBRID),
        mock=mode is Mode.MOCK,
        local=mode is Mode.LOCAL,
    )


# -- the adapters the settings ask for ---------------------------------------------------------


def build_backends(s: Settings, metrics: Metrics) -> dict[Backend, EmbeddingBackend]:
    mode = s.processing_mode
    out: dict[Backend, EmbeddingBackend] = {}
    if mode is Mode.MOCK:
        out[Backend.MOCK] = MockBackend(s.embedding_dimensions, latency=s.mock_latency_ms / 1000)
    if mode is Mode.LOCAL:
        from processor.effects.backends.local import LocalBackend

        out[Backend.LOCAL] = LocalBackend(s.embedding_dimensions, max_items=s.max_batch_size)
    if mode in (Mode.OLLAMA, Mode.HYBRID):
        from processor.effects.backends.ollama import OllamaBackend

        out[Backend.OLLAMA] = OllamaBackend(
            base_url=s.ollama_base_url, models=s.supported_models, timeout=s.ollama_timeout,
            download_timeout=s.ollama_model_download_timeout, keep_alive=s.ollama_keep_alive,
            truncate=s.ollama_truncate, max_batch=s.max_batch_size, metrics=metrics,
            strict=mode is Mode.OLLAMA,
        )
    if mode in (Mode.OPENAI, Mode.HYBRID):
        from processor.effects.backends.openai import OpenAIBackend

        assert s.openai_api_key
        out[Backend.OPENAI] = OpenAIBackend(
            api_key=s.openai_api_key, base_url=s.openai_base_url, dimensions=s.embedding_dimensions,
            timeout=s.openai_timeout, max_batch=s.max_batch_size, metrics=metrics,
        )
    return out


def build_chat_backends(s: Settings, metrics: Any) -> dict[Backend, ChatBackend]:
    """mock: the mock; ollama: Ollama; openai: OpenAI; hybrid: both (routed by model name)."""
    from processor.effects.chat.metrics import chat_metrics

    cm = chat_metrics(metrics)
    mode = s.processing_mode
    out: dict[Backend, ChatBackend] = {}
    if mode is Mode.MOCK:
        from processor.effects.chat.mock import MockChat

        out[Backend.MOCK] = MockChat(metrics=cm, latency=s.mock_latency_ms / 1000)
    if mode in (Mode.OLLAMA, Mode.HYBRID):
        from processor.effects.chat.ollama import OllamaChat

        out[Backend.OLLAMA] = OllamaChat(
            base_url=s.ollama_base_url, timeout=s.ollama_timeout, download_timeout=s.ollama_model_download_timeout,
            keep_alive=s.ollama_keep_alive, num_ctx=s.chat_num_ctx, max_tokens=s.chat_max_tokens, metrics=cm,
        )
    if mode in (Mode.OPENAI, Mode.HYBRID):
        from processor.effects.chat.openai import OpenAIChat

        assert s.openai_api_key
        out[Backend.OPENAI] = OpenAIChat(
            api_key=s.openai_api_key, base_url=s.openai_base_url, timeout=s.openai_timeout,
            max_tokens=s.chat_max_tokens, metrics=cm,
        )
    return out


def build_wikidata(s: Settings, metrics: ChatMetrics, *, redis_client: Any = None, guard: Guard | None = None) -> Enricher | None:
    """The enricher the settings ask for: None when WIKIDATA_ENABLED is false, the mock in
    mock mode (unless WIKIDATA_API_URL is set to another endpoint), else the real adapter
    with a SQLite cache in STATE_DIR or, with STATE_BACKEND=redis, a Redis cache and lock on
    `redis_client` (a coredis client the caller has entered: `async with client:`; without
    one, the SQLite cache, with a warning)."""
    if not s.wikidata_enabled:
        return None
    from processor.config import PROJECT_URL, WIKIDATA_API_URL
    from processor.effects.logs import get_logger
    from processor.effects.wikidata import Cache, MockWikidata, RedisCache, SqliteCache, Turn, Wikidata

    if s.processing_mode is Mode.MOCK and s.wikidata_api_url == WIKIDATA_API_URL:
        return MockWikidata(metrics)
    if s.wikidata_contact == PROJECT_URL:
        get_logger("wikidata").warning(
            "wikidata_contact_not_set", contact=PROJECT_URL,
            message="WIKIDATA_CONTACT is not set: Wikimedia's policy asks for a way to reach the operator "
                    "(an e-mail address or a URL) in the User-Agent")
    cache: Cache
    if s.state_backend is StateBackend.REDIS and redis_client is None:
        get_logger("wikidata").warning("wikidata_cache_not_shared", why="no Redis client was handed over",
                                       cache=str(Path(s.state_dir) / "wikidata.db"))
    if s.state_backend is StateBackend.REDIS and redis_client is not None:
        cache = RedisCache(redis_client, prefix=s.redis_key_prefix)
        turn = Turn(redis_client, prefix=s.redis_key_prefix)
    else:
        cache = SqliteCache(Path(s.state_dir) / "wikidata.db")
        turn = Turn()
    return Wikidata(
        api_url=s.wikidata_api_url, contact=s.wikidata_contact, language=s.wikidata_language,
        timeout=s.wikidata_timeout_seconds, cache=cache, cache_ttl=s.wikidata_cache_ttl_seconds,
        metrics=metrics, guard=guard, turn=turn,
    )


def build_chat_ports(s: Settings, metrics: Any, kinds: Mapping[str, Any], *, redis_client: Any = None) -> tuple[dict[Backend, ChatBackend], Any]:
    """The chat adapters and the Wikidata enricher, when a kind this worker runs needs them
    (else none: an embeddings-only worker opens no chat client)."""
    if not any(getattr(k, "dependency", None) is Dependency.CHAT for k in kinds.values()):
        return {}, None
    from processor.effects.chat.metrics import chat_metrics

    return build_chat_backends(s, metrics), build_wikidata(s, chat_metrics(metrics), redis_client=redis_client)


# -- the stages' ports --------------------------------------------------------------------------


@attrs.frozen
class Stages:
    """Each stage's port: what it touches, nothing else (`processor.stages`)."""

    intake: IntakePorts
    claim: ClaimPorts
    batch: BatchPorts
    embed: EmbedPorts
    report: Reporter
    recovery: RecoveryPorts


@attrs.frozen
class Pipeline:
    """What `build_pipeline` made for one run: the state the stages share, as the daemon
    reads it (/health, /ready, the scrape-time gauges, the shutdown), and the stages' ports.
    The stages never see this object: each gets its own port from `stages`."""

    config: StageConfig
    routing: Routing
    book: Book
    board: BackendBoard
    admission: Admission
    api: TaskApi
    tokens: TokenProvider
    journal: JournalStore
    stopping: trio.Event
    stages: Stages


@attrs.frozen
class Adapters:
    """The adapters `build_pipeline` wires (besides the task API, its token and the journal)."""

    backends: Mapping[Backend, Any]
    guards: Mapping[Backend, Guard]
    limiter: Limiter
    openai_limiter: Limiter
    leases: Leases
    chat: Mapping[Backend, Any] = attrs.field(factory=dict)
    wikidata: Any = None


def build_pipeline(
    config: StageConfig,
    adapters: Adapters,
    *,
    metrics: Metrics,
    api: TaskApi,
    tokens: TokenProvider,
    journal: JournalStore,
    routing: Routing,
    kinds: Mapping[str, TaskKind] | None = None,
    rng: random.Random | None = None,
    wall: Callable[[], float] = time.time,
    adaptive: AdaptiveLimits | None = None,
) -> Pipeline:
    """The shared state (book, board, admission, `stopping`) and each stage's port over it."""
    from processor.kinds.embedding import EmbeddingKind

    if adaptive is None:  # the configured timeouts come from the settings (`AdaptiveLimits.from_settings`)
        adaptive = AdaptiveLimits(max_items=config.max_batch_size, max_in_flight=config.concurrency_limit, timeouts={})
    board = BackendBoard(adapters.backends, adapters.guards, adaptive=adaptive)
    admission = Admission(adapters.limiter, adapters.openai_limiter, adapters.leases)
    kinds = kinds if kinds is not None else {"text_embedding": EmbeddingKind()}
    book = Book(capacity=config.intake_capacity, journal=journal, leases=adapters.leases, api=api, metrics=metrics,
                refund=admission.refund, wall=wall)
    stopping = trio.Event()
    retry = RetryConfig.of(config, rng or random.Random())
    budgets = Budgets(admission, book, board, metrics, kinds, config.fallback_models)
    ports = KindPorts(embedding=adapters.backends, chat=adapters.chat, wikidata=adapters.wikidata,
                      budget=BudgetPort(budgets) if getattr(adapters.limiter, "budgets", False) else None)
    reporter = Reporter(book, api, adapters.leases, metrics, retry, stopping, wall, concurrency=config.concurrency_limit)
    stages = Stages(
        intake=IntakePorts(api, board, book, admission, kinds, routing, metrics, retry, wall, stopping, reporter.deliver,
                           polling_interval_seconds=config.polling_interval_seconds),
        claim=ClaimPorts(book, admission, board.guards, api, budgets, metrics, retry, stopping, wall,
                         max_batch_size=config.max_batch_size, polling_interval_seconds=config.polling_interval_seconds),
        batch=BatchPorts(kinds, metrics, stopping, max_batch_size=config.max_batch_size,
                         batch_max_wait_ms=config.batch_max_wait_ms),
        embed=EmbedPorts(book, board, kinds, ports, metrics, retry, journal, budgets, reporter.deliver, stopping,
                         max_task_attempts=config.max_task_attempts, fallback_models=config.fallback_models),
        report=reporter,
        recovery=RecoveryPorts(journal, book, admission, api, metrics, retry, wall, stopping, reporter),
    )
    return Pipeline(config, routing, book, board, admission, api, tokens, journal, stopping, stages)


# -- signals and the run -----------------------------------------------------------------------


OS_SIGNALS = OsSignals()  # the process's SIGTERM/SIGINT, handed to the daemon `run` starts


def install_fallback_handlers(signals: OsSignals = OS_SIGNALS) -> Callable[[], None]:
    """Route SIGTERM/SIGINT to `signals.remember` outside the daemon's own receiver."""
    old = {s: signal.signal(s, signals.remember) for s in SHUTDOWN_SIGNALS}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


def ignore_signals() -> None:
    for s in SHUTDOWN_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


async def run(settings: Settings) -> int:
    from processor.daemon import Daemon  # the daemon takes its adapters' settings from here

    if settings.state_backend is StateBackend.REDIS:
        return await _run_with_redis(settings)
    return await Daemon(settings, signals=OS_SIGNALS).run()


async def _run_with_redis(settings: Settings) -> int:
    async with redis_daemon(settings, signals=OS_SIGNALS) as daemon:
        return await daemon.run()


@asynccontextmanager
async def redis_daemon(settings: Settings, *, signals: OsSignals | None = None) -> AsyncIterator[Daemon]:
    """STATE_BACKEND=redis: a daemon on the shared limiters, leases, Wikidata cache and turn,
    with the tasks that keep them alive running until the block ends (the caller runs it)."""
    from processor.daemon import Daemon
    from processor.effects.redis_state import RedisLeases, RedisShared, build_limiter, make_client

    client = make_client(settings.redis_url)
    async with client:
        metrics = Metrics()
        shared = RedisShared(client, prefix=settings.redis_key_prefix, metrics=metrics)
        global_config, openai_config = limiter_configs(settings)
        leases = RedisLeases(shared, ttl=settings.lease_ttl_seconds)
        daemon = Daemon(settings, metrics=metrics, leases=leases, redis_client=client, signals=signals,
                        limiter=build_limiter(global_config, shared, metrics=metrics),
                        openai_limiter=build_limiter(openai_config, shared, metrics=None))
        async with trio.open_nursery() as n:
            n.start_soon(leases.renew_forever)
            n.start_soon(shared.watch)
            yield daemon
            n.cancel_scope.cancel()
