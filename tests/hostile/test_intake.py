"""Intake: whatever the pending list holds, one entry never stops the others.

(One focused regression test per defect of issue 11 that can be seen from outside: the
daemon runs as its own process against the sandbox and the fake embedding server, over HTTP
only; each fails on a6a26dd. `HOSTILE_DAEMON_SRC=<tree>/src` runs another tree's daemon.)
"""

from __future__ import annotations

import pytest
import trio

from processor.sandbox.app import PendingShape
from processor.sandbox.harness import LOCAL_MODEL, assert_holds, pending_entry


async def test_an_id_with_a_trailing_newline_never_stops_the_others(world):
    world.offer_valid(4)
    bad = world.sandbox.new_id() + "\n"
    world.offer_raw(pending_entry(bad, {"text": "newline id", "model": LOCAL_MODEL}), key=bad, expect="stay", note="_id with a trailing newline")
    world.offer_valid(4)
    d = await world.start()
    await world.wait_quiet()
    await assert_holds(world, d)
    # the bad entry left no trail that crashes a restart
    await d.stop()
    world.offer_valid(2)
    d2 = await world.start()
    await world.wait_quiet()
    await assert_holds(world, d2)


async def test_an_integer_of_2_to_the_64_anywhere_in_the_list_blocks_nothing(world):
    tid = world.sandbox.new_id()
    text = "a task whose extra fields hold huge integers"
    world.offer_raw(pending_entry(tid, {"text": text, "model": LOCAL_MODEL}, __v=2**64, callbackParams={"targetId": 2**70, "n": -(2**63) - 1}),
                    key=tid, expect="succeed", text=text, model=LOCAL_MODEL, note="__v = 2**64")
    world.offer_valid(6)
    d = await world.start()
    await world.wait_quiet()
    await assert_holds(world, d)


async def test_lone_surrogates_are_never_embedded_nor_fatal(world):
    world.offer_valid(3)
    words = ("surrogate", "unicode", "utf", "text", "encod", "invalid")
    for text in ("\udc00", "a\ud800"):
        tid = world.sandbox.new_id()
        world.offer_raw(pending_entry(tid, {"text": text, "model": LOCAL_MODEL}), key=tid, expect="defect", words=words, note=f"text {text!r}")
    tid = world.sandbox.new_id()
    world.offer_raw(pending_entry(tid, {"text": "ok \ud83d\ude00", "model": LOCAL_MODEL}), key=tid, expect="succeed", text="ok \U0001f600",
                    model=LOCAL_MODEL, note="a valid surrogate pair")
    world.offer_valid(3)
    d = await world.start()
    await world.wait_quiet()
    await assert_holds(world, d)
    rewritten = [t for t in world.fake.inputs if t in ("a?", "?", "a\ufffd", "\ufffd")]
    assert not rewritten, f"a lone surrogate was rewritten and embedded: {rewritten}"


@pytest.mark.parametrize("body", [b"{}", b"null", b"wrap"], ids=["object", "null", "data-wrapper"])
async def test_a_pending_body_that_is_not_a_list_turns_ready_red(world, body):
    world.offer_valid(3)
    world.sandbox.pending_shape = PendingShape(mode="wrap") if body == b"wrap" else PendingShape(mode="raw", raw=body)
    d = await world.start(POLLING_INTERVAL_SECONDS="0.2")
    with trio.fail_after(120):
        while world.sandbox.requests[("pending", 200)] < 4:
            await trio.sleep(0.1)
    r = await d.get("/ready")
    assert r is not None and r.status_code == 503, f"/ready answered {r and r.status_code} to a pending body {body!r}: {r and r.text}"
    assert r.json()["reasons"], r.text
    world.calm()
    await world.wait_quiet()
    await assert_holds(world, d)
