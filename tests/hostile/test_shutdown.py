"""Reports and shutdown: nothing left in_progress, signals never kill.

(One focused regression test per defect of issue 11 that can be seen from outside: the
daemon runs as its own process against the sandbox and the fake embedding server, over HTTP
only; each fails on a6a26dd. `HOSTILE_DAEMON_SRC=<tree>/src` runs another tree's daemon.)
"""

from __future__ import annotations

import signal

import pytest
import trio

from processor.sandbox.app import Fault
from processor.sandbox.fake_backends import Answer
from processor.sandbox.harness import assert_holds


@pytest.mark.parametrize("status", [403, 409, 422])
async def test_a_4xx_on_the_final_report_leaves_nothing_in_progress(world, status):
    world.sandbox.faults["report"] = Fault(status=status, count=4)  # refused, not applied
    world.offer_valid(8)
    d = await world.start()
    await world.wait_quiet()
    await assert_holds(world, d)


async def test_a_forced_shutdown_during_claims_leaves_nothing_in_progress(world):
    slow = Fault(status=0, latency=2.0)  # claims take 2 s, then are applied
    world.sandbox.faults["claim"] = slow
    world.offer_valid(8)
    d = await world.start()
    with trio.fail_after(120):
        while slow.fired < 8:  # every claim PATCH is at the API
            await trio.sleep(0.02)
    d.signal(signal.SIGTERM)
    await trio.sleep(0.2)
    d.signal(signal.SIGTERM)  # forced: no grace
    await d.wait_exit(60)
    with trio.move_on_after(60):  # the API carries the abandoned claims out
        while len(world.sandbox.claim_times()) < 8:
            await trio.sleep(0.05)
    world.calm()
    d2 = await world.start()  # its start-up recovery must hand them back
    await world.wait_quiet()
    await assert_holds(world, d2)


@pytest.mark.parametrize("round_", range(3))
async def test_signals_during_shutdown_never_kill_the_process(world, round_):
    world.fake.answers = [Answer("hang", latency=30)]
    world.offer_valid(4)
    d = await world.start(SHUTDOWN_GRACE_SECONDS="2")
    with trio.fail_after(120):
        while not world.fake.received:
            await trio.sleep(0.05)
    d.signal(signal.SIGTERM)
    with trio.move_on_after(60):
        while d.alive():
            await trio.sleep(0.02 * (round_ + 1))
            d.signal(signal.SIGTERM)
    code = await d.wait_exit(60)
    assert code == 0, f"exit {code} after repeated SIGTERMs during shutdown\n{d.tail()}"


async def test_a_release_the_api_fails_once_is_sent_again(world):
    world.fake.known_models = ["text-embedding-3-small"]  # any other model: 404, the task is handed back
    world.sandbox.faults["release"] = Fault(status=500, count=2)
    world.offer_valid(3, model="text-embedding-3-small")
    for o in world.offer_valid(2, model="not-served-here", prefix="unserved"):
        o.expect = "stay"
    d = await world.start("openai")
    await world.wait_quiet()
    await assert_holds(world, d, openai=True)
