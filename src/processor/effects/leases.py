"""Task leases: which replica may work on a task. One replica needs none (`NoLeases`);
several replicas share leases through Redis (`processor.effects.redis_state`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Leases(Protocol):
    async def acquire(self, task_ids: Sequence[str]) -> list[str]:
        """Take leases; returns the ids this replica now holds (others are skipped)."""
        ...

    async def release(self, task_ids: Sequence[str]) -> None:
        """Give leases back (the tasks return to pending): another replica may take them."""
        ...

    async def complete(self, task_ids: Sequence[str]) -> None:
        """The tasks were reported: keep others off them while stale pending lists age out."""
        ...

    async def live(self, task_ids: Sequence[str]) -> set[str]:
        """Which of these ids have a live lease held by anyone."""
        ...

    def lost(self) -> set[str]:
        """Ids whose lease this replica lost (renewal failed): abandon them unreported."""
        ...


class NoLeases:
    """A single replica: every task is ours."""

    async def acquire(self, task_ids: Sequence[str]) -> list[str]:
        return list(task_ids)

    async def release(self, task_ids: Sequence[str]) -> None:
        return None

    async def complete(self, task_ids: Sequence[str]) -> None:
        return None

    async def live(self, task_ids: Sequence[str]) -> set[str]:
        return set()

    def lost(self) -> set[str]:
        return set()
