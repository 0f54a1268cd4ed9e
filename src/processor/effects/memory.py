"""Giving freed memory back to the system (glibc's `malloc_trim`).

A long-running daemon's RSS rises to the high-water mark of its allocators: after a burst
(a fault phase piles up claims, vectors and 20 KB result bodies) glibc keeps the freed
pages inside its heap, and new bursts land in different places of it, so RSS creeps up
while the bytes in use stay flat (docs/benchmarks.md, the soak's memory figures).
`malloc_trim(0)` hands every whole free page of every arena back (`madvise`), which is what
an operator watching RSS, or an OOM killer, sees.

Every `MEMORY_TRIM_INTERVAL_SECONDS` (default 60; 0 turns it off) the daemon calls it once.
On a C library without `malloc_trim` (musl, macOS) there is nothing to call: the loop logs
that once and ends; nothing else changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import trio

from processor.effects.logs import get_logger

Trim = Callable[[], bool]


def malloc_trim() -> Trim | None:
    """glibc's `malloc_trim(0)` as a function returning whether memory was released, or None
    when this C library has none."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return lambda: bool(fn(0))


async def trim_memory(interval: float, *, trim: Trim | None = None) -> None:
    """Call `trim` (default: `malloc_trim()`) every `interval` seconds until cancelled. One
    call takes about a millisecond on the daemon's 25 MB heap (bench/soak.py --memstats)."""
    log = get_logger("memory")
    if interval <= 0:
        return
    if trim is None:
        trim = malloc_trim()
    if trim is None:
        log.info("memory_trim_unavailable", reason="this C library has no malloc_trim")
        return
    while True:
        await trio.sleep(interval)
        trim()
