"""Backends: one input that breaks the server, a busy server (retry budgets that refill).

(One focused regression test per defect of issue 11 that can be seen from outside: the
daemon runs as its own process against the sandbox and the fake embedding server, over HTTP
only; each fails on a6a26dd. `HOSTILE_DAEMON_SRC=<tree>/src` runs another tree's daemon.)
"""

from __future__ import annotations

from processor.sandbox.harness import (
    LOCAL_MODEL,
    assert_holds,
)


async def test_one_input_that_breaks_ollama_fails_no_other_task(world):
    world.fake.poison = ["POISON"]
    world.offer_valid(6)
    tid = world.sandbox.create({"type": "text_embedding", "content": {"text": "a POISON pill", "model": LOCAL_MODEL}})["_id"]
    from processor.sandbox.harness import Offered, assert_holds

    world.offered.append(Offered(tid, "defect", "a POISON pill", LOCAL_MODEL, (), "input that makes Ollama answer 500"))
    world.offer_valid(6)
    d = await world.start()
    await world.wait_quiet()
    await assert_holds(world, d)


async def test_busy_ollama_every_task_succeeds_without_release_churn(world):
    world.fake.busy = 0.2
    n = 240
    world.offer_valid(n)
    d = await world.start(MAX_BATCH_SIZE="4")
    await world.wait_quiet()
    await assert_holds(world, d)
    per_task = len(world.sandbox.patches) / n
    assert per_task <= 2.05, f"{per_task:.3f} PATCHes per task with 20 % 503s (release churn)"
