"""Serving small ASGI apps with hypercorn on trio (the health server, the sandbox)."""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

# hypercorn logs every dropped connection at ERROR; the apps' own logs say what matters.
logging.getLogger("hypercorn.error").setLevel(logging.CRITICAL)


async def serve_asgi(
    app: Any,
    host: str,
    port: int,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown` is set. Port 0 picks a free port; `nursery.start` returns the
    bound URL."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = 75
    config.graceful_timeout = 3
    config.backlog = 1024
    await serve(app, config, shutdown_trigger=shutdown.wait, task_status=_FirstBind(task_status))


class _FirstBind:
    """hypercorn reports every bound address; callers want the first as a URL."""

    def __init__(self, task_status: Any) -> None:
        self._status = task_status

    def started(self, binds: list[str] | None = None) -> None:
        self._status.started(binds[0] if binds else None)


async def lifespan(receive: Any, send: Any) -> None:
    """Answer the ASGI lifespan protocol (an app must, or hypercorn complains)."""
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
