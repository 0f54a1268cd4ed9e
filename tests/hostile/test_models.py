"""Models: one this deployment does not serve stays pending, counted per model in /metrics and named in /health.

(One focused regression test per defect of issue 11 that can be seen from outside: the
daemon runs as its own process against the sandbox and the fake embedding server, over HTTP
only; each fails on a6a26dd. `HOSTILE_DAEMON_SRC=<tree>/src` runs another tree's daemon.)
"""

from __future__ import annotations

import trio

from processor.sandbox.harness import (
    assert_holds,
)


async def test_a_model_this_deployment_does_not_serve_stays_pending_counted_and_named(world):
    world.offer_valid(3)
    for o in world.offer_valid(2, model="not-served-embedder"):
        o.expect = "stay"
    d = await world.start()
    await world.wait_quiet()
    await trio.sleep(1.5)  # a few more polls
    await assert_holds(world, d)
    health, metrics = await d.get("/health"), await d.get("/metrics")
    assert health is not None and "not-served-embedder" in health.text, "the unserved model is not named in /health"
    assert metrics is not None and "not-served-embedder" in metrics.text, "the unserved model is not counted in /metrics"
