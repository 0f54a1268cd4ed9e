"""The process's SIGTERM/SIGINT, as a source of shutdown requests for the daemon.

While the daemon runs, `OsSignals.watch` holds a Trio signal receiver and reports each
signal (its name and how many came so far). Outside that window (start-up, the last
shielded clean-up) the composition root routes the signals to `remember`
(`processor.wiring.install_fallback_handlers`): one that came before the receiver was in
place is reported as soon as it is (`"early"`), so it still starts the shutdown, and a
second one can never kill the process by the default action.

A daemon given no signal source (`Daemon(signals=None)`: tests, the demo) listens to none;
its owner stops it with `Daemon.stop()`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any, Protocol

import trio

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalSource(Protocol):
    async def watch(self, on_signal: Callable[[str, int], None], *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Call `on_signal(name, count)` for every signal until cancelled."""


class OsSignals:
    """SIGTERM and SIGINT of this process."""

    def __init__(self) -> None:
        self.early: list[int] = []  # signals that came while no receiver was in place

    def remember(self, signum: int, frame: Any) -> None:
        """A signal handler: keep the signal for the next `watch`."""
        self.early.append(signum)

    async def watch(self, on_signal: Callable[[str, int], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
            task_status.started()
            count = 0
            if self.early:  # a signal came before the receiver was in place: report it now
                count = len(self.early)
                self.early.clear()
                on_signal("early", count)
            async for signum in signals:
                count += 1
                on_signal(signal.Signals(signum).name, count)
