"""Serve an ASGI app with hypercorn on trio; `nursery.start` returns the bound URL."""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

# hypercorn logs every connection error at ERROR; the app's own logs say what matters.
logging.getLogger("hypercorn.error").setLevel(logging.CRITICAL)


async def serve_asgi(
    app: Any,
    host: str,
    port: int,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown` is set. Port 0 picks a free port; the URL is reported."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = 75
    config.graceful_timeout = 3
    config.backlog = 1024
    binds = await _start(app, config, shutdown, task_status)
    del binds


async def _start(app: Any, config: Config, shutdown: trio.Event, task_status: Any) -> None:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(lambda *, task_status: serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status))
        url = bound[0] if bound else None
        task_status.started(url)
