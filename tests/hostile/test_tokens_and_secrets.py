"""Tokens, secrets and state files.

(One focused regression test per defect of issue 11 that can be seen from outside: the
daemon runs as its own process against the sandbox and the fake embedding server, over HTTP
only; each fails on a6a26dd. `HOSTILE_DAEMON_SRC=<tree>/src` runs another tree's daemon.)
"""

from __future__ import annotations

import stat

import orjson
import trio

from processor.sandbox.app import TokenAnswer
from processor.sandbox.fake_backends import Answer
from processor.sandbox.harness import API_KEY, REMOTE_MODEL, assert_holds


async def test_nan_expires_in_does_not_fetch_a_token_per_request(world):
    world.sandbox.token_answer = TokenAnswer(fields={"expires_in": b"NaN"})
    world.offer_valid(40)
    d = await world.start(MAX_BATCH_SIZE="4")
    await world.wait_quiet()
    await assert_holds(world, d)
    assert world.sandbox.token_requests <= 3, f"{world.sandbox.token_requests} token requests for one NaN-lived token"


async def test_a_non_ascii_access_token_never_ends_the_daemon(world):
    world.sandbox.token_answer = TokenAnswer(fields={"access_token": b'"tok-\\u00e4\\u00f6\\u00fc-0123456789"'}, count=3)
    world.offer_valid(6)
    d = await world.start()
    with trio.fail_after(120):  # the three odd tokens were handed out
        while world.sandbox.token_answer is not None and (world.sandbox.token_answer.count or 0) > 0 and d.alive():
            await trio.sleep(0.05)
    await trio.sleep(1)  # and used
    world.calm()
    await world.wait_quiet()
    await assert_holds(world, d)


async def test_state_files_are_private(world):
    world.offer_valid(5)
    d = await world.start(RATE_LIMIT_ENABLED="true", RATE_LIMIT_PER_DAY="1000")
    await world.wait_quiet()
    state = world.tmp / "state"
    files = sorted(p for p in state.rglob("*") if p.is_file())
    assert any(p.name.startswith("journal.db") for p in files) and any(p.name.startswith("rate_limits") for p in files), files
    loose = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) & 0o077}
    assert not loose, f"state files readable by others (journal holds task texts): {loose}"
    await assert_holds(world, d)


async def test_health_ready_and_metrics_never_show_secrets_from_error_texts(world):
    secret_echo = f"Incorrect API key provided: {API_KEY}. You can find your API key at the dashboard."
    body = orjson.dumps({"error": {"message": secret_echo, "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}})
    world.fake.answers = [Answer("status", status=429, body=body, count=2), Answer("status", status=401, body=body.replace(b"insufficient_quota", b"invalid_api_key"))]
    cs = world.sandbox.client_secret
    world.sandbox.token_answer = TokenAnswer(raw=orjson.dumps({"error": f"invalid_client {cs}", "error_description": f"bad secret {cs}"}),
                                             status=401, count=1)
    for o in world.offer_valid(4, model=REMOTE_MODEL):
        o.expect = "stay"
    d = await world.start("openai")
    with trio.fail_after(120):  # every echoing error was answered
        while d.alive() and (sum(a.fired for a in world.fake.answers) < 3 or (world.sandbox.token_answer.count or 0) > 0):
            await trio.sleep(0.05)
    await trio.sleep(2)  # and shown wherever the daemon shows errors
    leaks = await world.leaks(d)
    assert not leaks, leaks
