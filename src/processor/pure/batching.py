"""Group claimed tasks into backend requests.

A batch is keyed by (backend, model). It closes when it is full, or `max_wait` seconds
after its first item arrived once items have stopped coming (none for `max_wait / 5`).
A lone task therefore waits exactly `max_wait`; a steady stream (a backlog) keeps filling
the batch until it is full, but never longer than `HOLD_FACTOR * max_wait`. The stream
matters because claims reach the batcher at the task API's pace, which is usually far
slower than `max_size / max_wait`: closing on the first task's clock alone would send
small batches exactly when there is a backlog.

`chunk` splits a list by item count and by an estimated weight (tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import attrs

T = TypeVar("T")


HOLD_FACTOR = 10
QUIET_FRACTION = 0.2


@attrs.frozen
class Batch(Generic[T]):
    key: Hashable
    items: tuple[T, ...]
    opened_at: float
    last_at: float = 0.0  # when the latest item arrived


@attrs.frozen
class Batcher(Generic[T]):
    max_size: int
    max_wait: float
    open: dict[Hashable, Batch[T]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError("max_size must be >= 1")


def add(state: Batcher[T], key: Hashable, item: T, now: float) -> tuple[Batcher[T], list[Batch[T]]]:
    """Add one item; returns the batches that closed because they became full."""
    current = state.open.get(key)
    items = (current.items if current else ()) + (item,)
    opened = current.opened_at if current else now
    new_open = dict(state.open)
    if len(items) >= state.max_size:
        new_open.pop(key, None)
        return attrs.evolve(state, open=new_open), [Batch(key, items, opened, now)]
    new_open[key] = Batch(key, items, opened, now)
    return attrs.evolve(state, open=new_open), []


def closes_at(state: Batcher[T], b: Batch[T]) -> float:
    """When batch `b` closes if no more items arrive."""
    quiet = max(b.opened_at + state.max_wait, b.last_at + state.max_wait * QUIET_FRACTION)
    return min(quiet, b.opened_at + HOLD_FACTOR * state.max_wait)


def due(state: Batcher[T], now: float) -> tuple[Batcher[T], list[Batch[T]]]:
    """Close the batches whose wait has run out."""
    ready = [b for b in state.open.values() if now >= closes_at(state, b)]
    if not ready:
        return state, []
    new_open = {k: b for k, b in state.open.items() if now < closes_at(state, b)}
    return attrs.evolve(state, open=new_open), ready


def flush(state: Batcher[T]) -> tuple[Batcher[T], list[Batch[T]]]:
    """Close every open batch (end of input)."""
    return attrs.evolve(state, open={}), list(state.open.values())


def next_deadline(state: Batcher[T]) -> float | None:
    if not state.open:
        return None
    return min(closes_at(state, b) for b in state.open.values())


def chunk(
    items: Sequence[T], *, max_items: int, max_weight: float, weight: Callable[[T], float]
) -> list[list[T]]:
    """Split in order into chunks of at most `max_items` and `max_weight` each.

    An item heavier than `max_weight` on its own gets a chunk of its own (the caller decides
    whether that item is acceptable at all).
    """
    out: list[list[T]] = []
    cur: list[T] = []
    cur_w = 0.0
    for item in items:
        w = weight(item)
        if cur and (len(cur) >= max_items or cur_w + w > max_weight):
            out.append(cur)
            cur, cur_w = [], 0.0
        cur.append(item)
        cur_w += w
    if cur:
        out.append(cur)
    return out


def halves(items: Sequence[T]) -> tuple[list[T], list[T]]:
    """Split a failed batch to isolate a bad input."""
    mid = (len(items) + 1) // 2
    return list(items[:mid]), list(items[mid:])
