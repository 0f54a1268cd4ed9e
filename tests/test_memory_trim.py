"""Freed heap pages go back to the system (`processor.effects.memory`, MEMORY_TRIM_INTERVAL_SECONDS)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import trio

from processor.effects.memory import malloc_trim, trim_memory
from tests.test_config import load, problems


async def test_trims_once_per_interval_until_cancelled(autojump_clock):
    calls: list[float] = []
    with trio.move_on_after(10.5):
        await trim_memory(2.0, trim=lambda: calls.append(trio.current_time()) or True)
    assert [round(t) for t in calls] == [2, 4, 6, 8, 10]


async def test_interval_zero_turns_it_off(autojump_clock):
    calls: list[int] = []
    await trim_memory(0, trim=lambda: calls.append(1) or True)  # returns at once
    assert calls == []


async def test_a_c_library_without_malloc_trim_ends_the_loop(monkeypatch, autojump_clock):
    monkeypatch.setattr("processor.effects.memory.malloc_trim", lambda: None)
    with trio.fail_after(1):
        await trim_memory(1.0)  # nothing to call: logs once and returns


def test_setting_default_and_validation():
    assert load()[0].memory_trim_interval_seconds == 60.0
    assert load(MEMORY_TRIM_INTERVAL_SECONDS="0")[0].memory_trim_interval_seconds == 0.0
    assert "MEMORY_TRIM_INTERVAL_SECONDS" in problems(MEMORY_TRIM_INTERVAL_SECONDS="-1")


def test_on_glibc_a_freed_burst_goes_back_to_the_system():
    """In a fresh interpreter: a burst of small strings is freed (the heap keeps the pages),
    then one trim gives most of them back."""
    trim = malloc_trim()
    if platform.libc_ver()[0] != "glibc":
        assert trim is None
        return
    assert trim is not None
    script = textwrap.dedent("""
        import json, sys
        sys.path[:0] = %r
        from processor.effects.memory import malloc_trim
        def rss():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
        keep = []
        for burst in range(5):
            tmp = [json.dumps({"v": [i / 7 + burst for i in range(300)]}) for _ in range(3000)]
            keep.extend(tmp[::50])  # a few survivors pin the arenas' pages in place
            del tmp
        before = rss()
        malloc_trim()()
        print(before, rss())
    """) % (sys.path,)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    before, after = float(out[0]), float(out[1])
    assert after < before - 8, (before, after)  # about 16 MB come back on glibc 2.36
