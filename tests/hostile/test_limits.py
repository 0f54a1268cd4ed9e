"""Rate limits across crashes.

(One focused regression test per defect of issue 11 that can be seen from outside: the
daemon runs as its own process against the sandbox and the fake embedding server, over HTTP
only; each fails on a6a26dd. `HOSTILE_DAEMON_SRC=<tree>/src` runs another tree's daemon.)
"""

from __future__ import annotations

import os

import trio

from processor.sandbox.fake_backends import Answer


def claims(world) -> int:
    return sum(1 for p in world.sandbox.patches if p.state == "in_progress")


async def refused_by_the_limit(world, d, claimed: int) -> bool:
    """The daemon claimed nothing, nothing is in progress (its start-up recovery handed the
    crashed daemon's claims back) and its intake is paused by the rate limit."""
    if claims(world) != claimed or world.states().get("in_progress", 0):
        return False
    r = await d.get("/metrics")
    return r is not None and 'processor_intake_paused{reason="rate_limited"} 1.0' in r.text


async def had_its_chance(world, d, seen: int, claimed: int) -> None:
    """Until the backend got texts from this daemon, or the limit refused it everything (and
    a second look, a second later, finds no claim either): however slow the machine, never
    a guessed time. The timeout only turns a hang into the check of the test."""
    with trio.move_on_after(120):
        while d.alive() and len(world.fake.received) == seen:
            if await refused_by_the_limit(world, d, claimed):
                await trio.sleep(1.0)
                if await refused_by_the_limit(world, d, claimed):
                    return
            await trio.sleep(0.1)


async def test_a_crash_loop_never_sends_more_than_the_day_limit(world):
    world.fake.answers = [Answer("hang", latency=60)]  # the backend takes the texts and never answers
    world.offer_valid(12)
    for _ in range(4):
        seen = len(world.fake.received)
        claimed = claims(world)
        d = await world.start(RATE_LIMIT_ENABLED="true", RATE_LIMIT_PER_DAY="3")
        await had_its_chance(world, d, seen, claimed)
        await trio.sleep(0.3)
        d.kill()
    sent = {t for _, t in world.fake.input_log}
    assert len(sent) <= 3, f"{len(sent)} texts reached the backend at RATE_LIMIT_PER_DAY=3 across 4 crashes"
    assert os.path.exists(world.tmp / "state")
