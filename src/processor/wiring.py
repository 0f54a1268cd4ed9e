"""The composition root: builds the daemon for the configured state backend and runs it.

SQLite (one worker) and Redis (replicas sharing quotas and leases) differ only in which
limiters and leases the daemon gets and which background tasks keep them alive; everything
else is the same `Daemon`. Adapters never import this module.

Signals: the daemon installs its own receiver while it runs. Before and after that window
(start-up, the last shielded clean-up), SIGTERM/SIGINT land in `remember_signal`, so a
second signal during shutdown can never kill the process by the default action; one that
arrives before the receiver is in place starts the shutdown as soon as it is.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import trio

from processor.config import Settings, StateBackend
from processor.daemon import EARLY_SIGNALS, Daemon
from processor.effects.auth import TokenConfig

# -- what each adapter gets of the settings ---------------------------------------------------


def token_config(s: Settings) -> TokenConfig:
    return TokenConfig(token_url=s.oauth2_token_url, client_id=s.oauth2_client_id, client_secret=s.oauth2_client_secret,
                       scope=s.oauth2_scope, auth_method=s.oauth2_auth_method)


# -- signals and the run -----------------------------------------------------------------------


def remember_signal(signum: int, frame: Any) -> None:
    EARLY_SIGNALS.append(signum)


def install_fallback_handlers() -> Callable[[], None]:
    """Route SIGTERM/SIGINT to `remember_signal` outside the daemon's own receiver."""
    old = {s: signal.signal(s, remember_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


def ignore_signals() -> None:
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


async def run(settings: Settings) -> int:
    if settings.state_backend is StateBackend.REDIS:
        return await _run_with_redis(settings)
    return await Daemon(settings).run()


async def _run_with_redis(settings: Settings) -> int:
    from processor.effects.metrics import Metrics
    from processor.effects.redis_state import RedisLeases, RedisShared, build_limiters, make_client

    client = make_client(settings)
    async with client:
        metrics = Metrics()
        shared = RedisShared(client, prefix=settings.redis_key_prefix, metrics=metrics)
        limiter, openai_limiter = build_limiters(settings, shared, metrics)
        leases = RedisLeases(shared, ttl=settings.lease_ttl_seconds)
        daemon = Daemon(settings, metrics=metrics, limiter=limiter, openai_limiter=openai_limiter, leases=leases,
                        redis_client=client)  # the Wikidata cache and turn are shared too
        async with trio.open_nursery() as n:
            n.start_soon(leases.renew_forever)
            n.start_soon(shared.watch)
            code = await daemon.run()
            n.cancel_scope.cancel()
        return code
