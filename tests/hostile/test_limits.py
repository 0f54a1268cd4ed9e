"""Rate limits across crashes.

(One focused regression test per defect of issue 11 that can be seen from outside: the
daemon runs as its own process against the sandbox and the fake embedding server, over HTTP
only; each fails on a6a26dd. `HOSTILE_DAEMON_SRC=<tree>/src` runs another tree's daemon.)
"""

from __future__ import annotations

import os

import trio

from processor.sandbox.fake_backends import Answer


async def test_a_crash_loop_never_sends_more_than_the_day_limit(world):
    world.fake.answers = [Answer("hang", latency=60)]  # the backend takes the texts and never answers
    world.offer_valid(12)
    for _ in range(4):
        seen = len(world.fake.received)
        d = await world.start(RATE_LIMIT_ENABLED="true", RATE_LIMIT_PER_DAY="3")
        with trio.move_on_after(60):
            while len(world.fake.received) == seen and d.alive():
                await trio.sleep(0.05)
        await trio.sleep(0.3)
        d.kill()
    sent = {t for _, t in world.fake.input_log}
    assert len(sent) <= 3, f"{len(sent)} texts reached the backend at RATE_LIMIT_PER_DAY=3 across 4 crashes"
    assert os.path.exists(world.tmp / "state")
