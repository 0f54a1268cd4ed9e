"""The pacing hooks of the OpenAI adapters (effects/openai_pacing.py) and the fake OpenAI
with a real limit (sandbox/fake_openai_limits.py)."""

from __future__ import annotations

import httpx
import pytest
import respx
import trio
from prometheus_client import CollectorRegistry

from processor.effects.backends.base import EmbedError
from processor.effects.chat.base import ChatError, ChatRequest
from processor.effects.chat.metrics import ChatMetrics
from processor.effects.chat.openai import OpenAIChat
from processor.pure import token_pacing as tp
from processor.pure.faults import Fault
from processor.sandbox.fake_openai_limits import LimitState, count_tokens
from tests.test_backends import MODEL, OPENAI, openai_backend, openai_ok

LIMITS = {"x-ratelimit-limit-tokens": "10000", "x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "99",
          "x-ratelimit-reset-requests": "1s"}


def with_limits(remaining: int, reset: str):
    def answer(request: httpx.Request) -> httpx.Response:
        r = openai_ok(request)
        r.headers.update({**LIMITS, "x-ratelimit-remaining-tokens": str(remaining), "x-ratelimit-reset-tokens": reset})
        return r

    return answer


@respx.mock
async def test_embeddings_use_what_remains_then_wait_for_the_reset(autojump_clock):
    respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=with_limits(0, "20s"))
    b = openai_backend()
    await b.embed(MODEL, ["x" * 400])
    t0 = trio.current_time()
    await b.embed(MODEL, ["y" * 400])  # nothing remains: waits for the announced reset
    waited = trio.current_time() - t0
    await b.aclose()
    assert 19.9 <= waited <= 20.5


@respx.mock
async def test_embeddings_go_at_once_while_tokens_remain(autojump_clock):
    respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=with_limits(9_000, "50s"))
    b = openai_backend()
    t0 = trio.current_time()
    for _ in range(5):
        await b.embed(MODEL, ["x" * 400])
    await b.aclose()
    assert trio.current_time() - t0 < 0.5
    assert b.pacer.model(MODEL).waits == 0


@respx.mock
async def test_a_429_holds_the_model_until_its_retry_after(autojump_clock):
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(trio.current_time())
        if len(calls) == 1:
            return httpx.Response(429, headers={**LIMITS, "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "30s",
                                                "retry-after": "7"},
                                  json={"error": {"message": "Rate limit reached", "type": "tokens", "code": "rate_limit_exceeded"}})
        return with_limits(9_000, "30s")(request)

    respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=answer)
    b = openai_backend()
    with pytest.raises(EmbedError) as info:
        await b.embed(MODEL, ["x"])
    assert (info.value.fault, info.value.retry_after) == (Fault.RATE_LIMITED, 7.0)
    await b.embed(MODEL, ["y"])
    await b.aclose()
    assert calls[1] - calls[0] >= 7.0


@respx.mock
async def test_usage_teaches_the_estimate_and_a_failed_call_releases_its_reservation(autojump_clock):
    def answer(request: httpx.Request) -> httpx.Response:
        r = openai_ok(request)
        body = r.json()
        body["usage"] = {"prompt_tokens": 300, "total_tokens": 300}  # 400 chars: 3x the chars/4 guess
        return httpx.Response(200, json=body, headers=r.headers)

    route = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=answer)
    b = openai_backend()
    pace = b.pacer.model(MODEL)
    before = pace.estimate(400)
    await b.embed(MODEL, ["x" * 400])
    assert pace.estimate(400) >= 300 > before
    route.mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(EmbedError):
        await b.embed(MODEL, ["x" * 400])
    assert pace.state.in_flight == ()  # nothing left reserved
    await b.aclose()


async def test_chat_is_paced_by_the_same_hooks(autojump_clock):
    answers = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal answers
        answers += 1
        return httpx.Response(200, headers={**LIMITS, "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "15s"}, json={
            "choices": [{"message": {"role": "assistant", "content": '{"ok": true}'}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 10}, "model": "gpt-4o-mini",
        })

    with respx.mock:
        respx.post(f"{OPENAI}/v1/chat/completions").mock(side_effect=answer)
        chat = OpenAIChat(api_key="sk-test-secret", base_url=OPENAI, timeout=5, max_tokens=100, metrics=ChatMetrics(CollectorRegistry()))
        req = ChatRequest("gpt-4o-mini", "system", "user text", {"type": "object"}, "check", "check")
        await chat.complete(req)
        t0 = trio.current_time()
        await chat.complete(req)
        waited = trio.current_time() - t0
        await chat.aclose()
    assert answers == 2 and 14.9 <= waited <= 15.5
    assert chat.pacer.model("gpt-4o-mini").state.completion < tp.DEFAULT_COMPLETION  # learnt from usage


async def test_chat_429_is_a_rate_limited_error_and_paces(autojump_clock):
    with respx.mock:
        respx.post(f"{OPENAI}/v1/chat/completions").mock(return_value=httpx.Response(
            429, headers={"retry-after": "3"}, json={"error": {"message": "slow down", "code": "rate_limit_exceeded"}}))
        chat = OpenAIChat(api_key="sk-test-secret", base_url=OPENAI, timeout=5, max_tokens=100, metrics=ChatMetrics(CollectorRegistry()))
        req = ChatRequest("gpt-4o-mini", "system", "user", {"type": "object"}, "check", "check")
        with pytest.raises(ChatError) as info:
            await chat.complete(req)
        assert info.value.fault is Fault.RATE_LIMITED
        t0 = trio.current_time()
        with pytest.raises(ChatError):
            await chat.complete(req)
        assert trio.current_time() - t0 >= 3.0
        await chat.aclose()


def test_fake_limits_a_sliding_minute_with_openai_headers():
    now = [0.0]
    st = LimitState(tpm=1_000, rpm=3, clock=lambda: now[0])
    ok, wait, headers = st.charge(600)
    h = {k.decode(): v.decode() for k, v in headers}
    assert ok and h["x-ratelimit-remaining-tokens"] == "400" and h["x-ratelimit-remaining-requests"] == "2"
    assert tp.parse_reset(h["x-ratelimit-reset-tokens"]) == 60.0
    now[0] = 10.0
    ok, wait, headers = st.charge(500)  # 600 + 500 > 1,000: refused, charged nothing
    assert not ok and wait == pytest.approx(50.0) and st.rejected == 1 and st.tokens == 600
    now[0] = 60.0  # the first charge has left the minute
    assert st.charge(500)[0] and st.charge(1)[0] and st.charge(1)[0]
    ok, wait, _ = st.charge(1)  # the fourth request within a minute: over the requests limit
    assert not ok and wait == pytest.approx(60.0)
    assert count_tokens("x" * 165) == 50
