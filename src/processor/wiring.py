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

import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from processor.config import Mode, Settings, StateBackend
from processor.effects.auth import TokenConfig
from processor.effects.signals import SHUTDOWN_SIGNALS, OsSignals
from processor.pure.faults import Dependency
from processor.pure.tasks import Backend

if TYPE_CHECKING:
    from processor.effects.chat.base import ChatBackend
    from processor.effects.chat.metrics import ChatMetrics
    from processor.effects.guard import Guard
    from processor.effects.wikidata import Enricher

# -- what each adapter gets of the settings ---------------------------------------------------


def token_config(s: Settings) -> TokenConfig:
    return TokenConfig(token_url=s.oauth2_token_url, client_id=s.oauth2_client_id, client_secret=s.oauth2_client_secret,
                       scope=s.oauth2_scope, auth_method=s.oauth2_auth_method)


# -- the adapters the settings ask for ---------------------------------------------------------


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
    from processor.daemon import Daemon
    from processor.effects.metrics import Metrics
    from processor.effects.redis_state import RedisLeases, RedisShared, build_limiters, make_client

    client = make_client(settings)
    async with client:
        metrics = Metrics()
        shared = RedisShared(client, prefix=settings.redis_key_prefix, metrics=metrics)
        limiter, openai_limiter = build_limiters(settings, shared, metrics)
        leases = RedisLeases(shared, ttl=settings.lease_ttl_seconds)
        daemon = Daemon(settings, metrics=metrics, limiter=limiter, openai_limiter=openai_limiter, leases=leases,
                        redis_client=client, signals=OS_SIGNALS)  # the Wikidata cache and turn are shared too
        async with trio.open_nursery() as n:
            n.start_soon(leases.renew_forever)
            n.start_soon(shared.watch)
            code = await daemon.run()
            n.cancel_scope.cancel()
        return code
