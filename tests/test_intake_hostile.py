"""Pending lists a real peer can legally send, served as exact raw bytes to the real daemon.

Each of these crashed the daemon, blocked the whole intake or was read as "nothing pending"
on a6a26dd (issue 11). A bad value must stay confined to its own entry.
"""

from __future__ import annotations

import httpx
import pytest
import trio

from processor.daemon import Daemon
from processor.effects.api import ApiError, TaskApi
from processor.effects.auth import TokenProvider
from processor.effects.guard import Guard
from processor.effects.metrics import Metrics
from processor.pure.breaker import BreakerConfig
from processor.pure.tasks import Backend
from tests.conftest import CountingBackend, make_settings, running, wait_until
from tests.rawfake import raw_world


def entry(tid: str, content: bytes, extra: bytes = b"", *, type_: bytes = b'"text_embedding"') -> bytes:
    return b'{"_id":"%s","type":%s,"state":"pending","content":%s%s}' % (tid.encode(), type_, content, extra)


def settled(st, ids, states=("succeeded", "failed")):
    return lambda: all(st.tasks[i]["state"] in states for i in ids)


def failed_reasons(st) -> dict[str, str]:
    return {p.task_id: p.body.get("reason") for p in st.patches if p.state == "failed"}


async def test_id_with_a_trailing_newline_is_rejected_and_never_patched(tmp_path):
    async with raw_world() as (world, sb):
        good = sb.state.seed(20)
        oid = sb.state.new_id()
        world.head = [entry(oid + "\\n", b'"some text"'), entry(oid.upper(), b'"some text"'), entry(" " + oid, b'"x"')]
        daemon = Daemon(make_settings(sb, tmp_path), backends={Backend.MOCK: CountingBackend()}, handle_signals=False)
        async with running(daemon):
            await wait_until(settled(sb.state, good))
            served = world.pending_served
            await wait_until(lambda: world.pending_served >= served + 2)  # polls go on; nothing crashes
        assert all(sb.state.tasks[i]["state"] == "succeeded" for i in good)
        assert all(p.task_id in good for p in sb.state.patches)
        assert daemon.metrics.registry.get_sample_value("ai_tasks_rejected_total", {"reason": "invalid_id"}) == 3


async def test_huge_numbers_spoil_only_their_own_entry(tmp_path):
    """Integers >= 2**63 (JavaScript writes them), beyond 2**64, 1e400: the rest is read."""
    async with raw_world() as (world, sb):
        st = sb.state
        bad_content = st.create({"content": "placeholder"})["_id"]
        big_v = st.create({"content": "placeholder"})["_id"]
        big_extra = st.create({"content": "placeholder"})["_id"]
        good = st.seed(30)
        world.entries[bad_content] = entry(bad_content, b"18446744073709551616123")
        world.entries[big_v] = entry(big_v, b'"text with a big version"', b',"__v":9223372036854775808')
        world.entries[big_extra] = entry(big_extra, b'{"text":"text with odd numbers","model":"m","n":1e400,"k":-99999999999999999999999,"deep":[[[{"a":[1.5e308]}]]]}')
        world.head = [b"123456789012345678901234567890", b"1e999", b'{"no_id":18446744073709551617}']
        backend = CountingBackend()
        daemon = Daemon(make_settings(sb, tmp_path), backends={Backend.MOCK: backend}, handle_signals=False)
        async with running(daemon):
            await wait_until(settled(st, [*good, bad_content, big_v, big_extra]))
        for i in (*good, big_v, big_extra):
            assert st.tasks[i]["state"] == "succeeded", i
        assert st.tasks[bad_content]["state"] == "failed"
        assert "content must be a string" in failed_reasons(st)[bad_content]


async def test_lone_surrogates_fail_their_task_with_a_reason_and_are_never_rewritten(tmp_path):
    async with raw_world() as (world, sb):
        st = sb.state
        cases = {
            "low": b'"\\udc00"',
            "high_then_text": b'"a\\ud800"',
            "in_dict": b'{"text":"ok \\udfff then","model":"m"}',
            "bad_utf8": b'"caf\xe9 au lait"',
            "bad_model": b'{"text":"fine text","model":"m\\ud800"}',
        }
        ids = {k: st.create({"content": "placeholder"})["_id"] for k in cases}
        for k, content in cases.items():
            world.entries[ids[k]] = entry(ids[k], content)
        bad_type = st.create({"content": "placeholder"})["_id"]
        world.entries[bad_type] = entry(bad_type, b'"text"', type_=b'"text_\\udc00embedding"')
        world.head = [b'{"_id":"\\ud800%s","type":"text_embedding","content":"x"}' % ("a" * 23).encode()]
        emoji = st.create({"content": "a valid pair: \U0001f600"})["_id"]
        good = st.seed(20)
        backend = CountingBackend()
        daemon = Daemon(make_settings(sb, tmp_path), backends={Backend.MOCK: backend}, handle_signals=False)
        async with running(daemon):
            await wait_until(settled(st, [*good, emoji, *ids.values()]))
            served = world.pending_served
            await wait_until(lambda: world.pending_served >= served + 2)
        reasons = failed_reasons(st)
        for k, i in ids.items():
            assert st.tasks[i]["state"] == "failed", k
            assert "not valid Unicode" in reasons[i], (k, reasons[i])
        assert st.tasks[emoji]["state"] == "succeeded"
        assert all(st.tasks[i]["state"] == "succeeded" for i in good)
        assert st.tasks[bad_type]["state"] == "pending" and st.patch_counts[bad_type] == 0
        embedded = set(backend.per_text)
        assert "a?" not in embedded and not any("?" in t or "\ufffd" in t for t in embedded)
        assert daemon.metrics.registry.get_sample_value("ai_tasks_rejected_total", {"reason": "invalid_id"}) == 1


def api_for(sb, tmp_path, http) -> TaskApi:
    s = make_settings(sb, tmp_path)
    metrics = Metrics()
    tokens = TokenProvider(http, s, metrics=metrics, guard=Guard("token", BreakerConfig()))
    return TaskApi(http, s.api_base_url, tokens, metrics=metrics, guard=Guard("api", BreakerConfig()), concurrency=4)


BAD_BODIES = {
    "object": b"{}",
    "null": b"null",
    "wrapped": b'{"data": [{"_id": "68b89107952364b0aad89c1d", "type": "text_embedding", "content": "x"}]}',
    "truncated": b'[{"_id": "68b89107952364b0aad89c1d", "type": "text_embedding", "content": "x"}, {"_id": "68b8',
    "html": b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>",
    "empty": b"",
    "trailing": b"[] []",
}


@pytest.mark.parametrize("kind", sorted(BAD_BODIES))
async def test_a_body_that_is_not_a_list_is_a_failed_poll(tmp_path, kind):
    async with raw_world() as (world, sb):
        world.body = BAD_BODIES[kind]
        if kind == "html":
            world.content_type = b"text/html"
        async with httpx.AsyncClient() as http:
            api = api_for(sb, tmp_path, http)
            got = []
            with pytest.raises(ApiError) as info:
                async with api.pending() as entries:
                    async for e in entries:
                        got.append(e)
            assert getattr(info.value, "fault", None) is not None and info.value.fault.value == "malformed" and info.value.status == 200
            assert api.last_success is None  # an unusable answer is not an answer
            world.body = b"[]"
            async with api.pending() as entries:
                assert [e async for e in entries] == []
            assert api.last_success is not None


async def test_readiness_goes_red_while_the_list_is_malformed(tmp_path):
    async with raw_world() as (world, sb):
        good = sb.state.seed(5)
        world.body = BAD_BODIES["wrapped"]
        daemon = Daemon(make_settings(sb, tmp_path), backends={Backend.MOCK: CountingBackend()}, handle_signals=False)
        async with running(daemon):
            await wait_until(lambda: world.pending_served >= 3)
            assert any("task API has not answered" in r for r in daemon.not_ready_reasons())
            assert all(sb.state.tasks[i]["state"] == "pending" for i in good)
            world.body = None  # the API heals: work resumes and /ready turns green
            await wait_until(settled(sb.state, good))
            await wait_until(lambda: not any("task API" in r for r in daemon.not_ready_reasons()))


async def test_patch_with_an_unusable_id_is_an_api_error_not_a_crash(tmp_path):
    async with raw_world() as (_world, sb):
        async with httpx.AsyncClient() as http:
            api = api_for(sb, tmp_path, http)
            for bad in ("68b89107952364b0aad89c1d\n", "68b8/../../x", "é" * 24, "\udc00" * 24, "", "68b89107952364b0aad89c1d?x=1"):
                with pytest.raises(ApiError) as info:
                    await api.patch(bad, "failed", reason="x")
                assert info.value.status == 400 and not info.value.sent
            assert sb.state.patches == []


async def test_a_stream_that_breaks_off_is_an_api_error(tmp_path):
    """The connection drops mid-body: the adapter's own error, never an httpx one."""
    async with raw_world() as (world, sb):
        sb.state.seed(3)
        async with httpx.AsyncClient() as http:
            api = api_for(sb, tmp_path, http)
            async with api.pending() as entries:
                first = [e async for e in entries]
            assert len(first) == 3

            async def drop(scope, receive, send):
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", b"100000")]})
                await send({"type": "http.response.body", "body": b'[{"a": 1}, ', "more_body": True})
                raise ConnectionResetError("gone")

            app = world.app
            world.app = drop  # type: ignore[assignment]
            world.body = None
            try:
                with pytest.raises(ApiError) as info:
                    async with api._stream("/api/ai-tasks?state=x", "/api/ai-tasks") as entries:
                        async for _ in entries:
                            pass
                assert info.value.kind.value == "retryable"
            finally:
                world.app = app
        await trio.lowlevel.checkpoint()
