"""Backends: malformed 200 answers, a rejected or ignored `dimensions`, Ollama's keep_alive, an Ollama that comes up late.

(One focused regression test per defect of issue 11 that can be seen from outside: the
daemon runs as its own process against the sandbox and the fake embedding server, over HTTP
only; each fails on a6a26dd. `HOSTILE_DAEMON_SRC=<tree>/src` runs another tree's daemon.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest
import trio

from processor.sandbox import serve_asgi
from processor.sandbox.fake_backends import Answer, FakeBackendState, FakeEmbeddings
from processor.sandbox.harness import (
    LOCAL_MODEL,
    REMOTE_MODEL,
    Daemon,
    assert_holds,
    free_port,
)


async def ready_red(d: Daemon, names: Callable[[str], bool], timeout: float = 120.0) -> httpx.Response | None:
    """/ready once it is 503 for a reason `names` accepts (or the last answer, at the timeout,
    which only turns a hang into a failure)."""
    r = None
    with trio.move_on_after(timeout):
        while d.alive():
            r = await d.get("/ready")
            if r is not None and r.status_code == 503 and names(r.text):
                break
            await trio.sleep(0.2)
    return r


@pytest.mark.parametrize("mode,kind", [("ollama", "null"), ("openai", "html"), ("openai", "no_data"), ("ollama", "truncated"),
                                       ("openai", "nan"), ("ollama", "wrong_types")])
async def test_malformed_200_answers_never_end_the_daemon(world, mode, kind):
    world.fake.answers = [Answer(kind, count=3)]
    world.offer_valid(8, model=LOCAL_MODEL if mode == "ollama" else REMOTE_MODEL)
    d = await world.start(mode, MAX_BATCH_SIZE="4")
    await world.wait_quiet()
    await assert_holds(world, d, openai=mode == "openai")


async def test_a_rejected_dimensions_parameter_fails_no_task_and_is_named(world):
    world.fake.native_dim = 384  # 400 "matryoshka_dim=1024 is not in a valid range"
    for o in world.offer_valid(20, model=REMOTE_MODEL):
        o.expect = "stay"  # a configuration problem: the tasks wait for a fix
    d = await world.start("openai")
    r = await ready_red(d, lambda text: "dim" in text.lower())
    await world.wait_quiet()  # the claims handed back, a few more polls
    # a split storm would be ~40 requests for 20 tasks at once; the breaker allows one probe
    # per wait (5 s, doubling), however slow the machine runs this test
    bound = 6 + int((time.monotonic() - d.started_at) / 5.0)
    assert world.fake.requests <= bound, f"{world.fake.requests} requests for one configuration problem (splitting as if an input were bad)"
    assert r is not None and r.status_code == 503 and "dim" in r.text.lower(), r and r.text
    await assert_holds(world, d)


async def test_a_server_that_ignores_dimensions_fails_no_task_and_is_named(world):
    world.fake.native_dim = 384
    world.fake.dimensions_mode = "ignore"
    for o in world.offer_valid(20, model=REMOTE_MODEL):
        o.expect = "stay"
    d = await world.start("openai")
    r = await ready_red(d, lambda text: "dim" in text.lower() or "384" in text)
    await world.wait_quiet()  # the claims handed back, a few more polls
    assert r is not None and r.status_code == 503 and ("dim" in r.text.lower() or "384" in r.text), r and r.text
    await assert_holds(world, d)


async def test_keep_alive_minus_one_goes_out_as_a_number(world):
    world.offer_valid(6)
    d = await world.start(OLLAMA_KEEP_ALIVE="-1")
    await world.wait_quiet()
    sent = {repr(r["keep_alive"]) for r in world.fake.received}
    assert sent == {"-1"}, f"keep_alive sent as {sent} (Ollama rejects the string '-1')"
    await assert_holds(world, d)


async def test_hybrid_with_ollama_late_fails_no_local_task(world):
    port = free_port()
    local = world.offer_valid(4, model=LOCAL_MODEL)
    world.offer_valid(4, model=REMOTE_MODEL, prefix="remote")
    late = FakeBackendState(base=0.005, per_input=0.0005, dim=768, serial=True)
    async with trio.open_nursery() as n:
        d = await world.start("hybrid", OLLAMA_BASE_URL=f"http://127.0.0.1:{port}", OLLAMA_MODEL_DOWNLOAD_TIMEOUT="2")
        await trio.sleep(3)  # past the start wait
        stop = trio.Event()
        await n.start(lambda task_status: serve_asgi(FakeEmbeddings(late), "127.0.0.1", port, shutdown=stop, task_status=task_status))
        await world.wait_quiet()
        stop.set()
    failed = [o.key for o in local if world.state_of(o.key) == "failed"]
    assert not failed, f"{len(failed)} local-model tasks failed because Ollama came up late: {world.sandbox.reasons.get(failed[0])!r}"
    await assert_holds(world, d, check_vectors=False)
