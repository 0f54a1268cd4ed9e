"""Pending lists a real peer can legally send, served as exact raw bytes (the sandbox's
hostile mode: `insert_raw_bytes`, `pending_shape`) to the real daemon.

Each of these crashed the daemon, blocked the whole intake or was read as "nothing pending"
on a6a26dd (issue 11). A bad value must stay confined to its own entry.
"""

from __future__ import annotations

import json

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.config import load_settings
from processor.daemon import Daemon
from processor.effects.api import ApiError, TaskApi
from processor.effects.auth import TokenProvider
from processor.effects.guard import Guard
from processor.effects.metrics import Metrics
from processor.pure.breaker import BreakerConfig
from processor.pure.jsonstream import unicode_problem
from processor.pure.tasks import Backend, Routing, Task, parse_entry
from processor.sandbox.app import PendingShape
from processor.wiring import token_config
from tests.conftest import CountingBackend, make_settings, running, wait_until


def entry(tid: str, content: bytes, extra: bytes = b"", *, type_: bytes = b'"text_embedding"') -> bytes:
    return b'{"_id":"%s","type":%s,"state":"pending","content":%s%s}' % (tid.encode(), type_, content, extra)


def settled(st, ids, states=("succeeded", "failed")):
    return lambda: all(st.tasks[i]["state"] in states for i in ids)


def polls(st) -> int:
    return sum(n for (route, _status), n in st.requests.items() if route == "pending")


def failed_reasons(st) -> dict[str, str]:
    return {p.task_id: p.body.get("reason") for p in st.patches if p.state == "failed"}


async def test_id_with_a_trailing_newline_is_rejected_and_never_patched(sandbox, tmp_path):
    sb = sandbox
    oid = sb.state.new_id()
    for raw in (entry(oid + "\\n", b'"some text"'), entry(oid.upper(), b'"some text"'), entry(" " + oid, b'"x"')):
        sb.state.insert_raw_bytes(raw)
    good = sb.state.seed(20)
    daemon = Daemon(make_settings(sb, tmp_path), backends={Backend.MOCK: CountingBackend()})
    async with running(daemon):
        await wait_until(settled(sb.state, good))
        served = polls(sb.state)
        await wait_until(lambda: polls(sb.state) >= served + 2)  # polls go on; nothing crashes
    assert all(sb.state.tasks[i]["state"] == "succeeded" for i in good)
    assert all(p.task_id in good for p in sb.state.patches)
    assert daemon.metrics.registry.get_sample_value("ai_tasks_rejected_total", {"reason": "invalid_id"}) == 3


async def test_huge_numbers_spoil_only_their_own_entry(sandbox, tmp_path):
    """Integers >= 2**63 (JavaScript writes them), beyond 2**64, 1e400: the rest is read."""
    sb = sandbox
    st = sb.state
    for raw in (b"123456789012345678901234567890", b"1e999", b'{"no_id":18446744073709551617}'):
        st.insert_raw_bytes(raw)
    bad_content, big_v, big_extra = st.new_id(), st.new_id(), st.new_id()
    st.insert_raw_bytes(entry(bad_content, b"18446744073709551616123"), bad_content)
    st.insert_raw_bytes(entry(big_v, b'"text with a big version"', b',"__v":9223372036854775808'), big_v)
    st.insert_raw_bytes(entry(big_extra, b'{"text":"text with odd numbers","model":"m","n":1e400,"k":-99999999999999999999999,"deep":[[[{"a":[1.5e308]}]]]}'), big_extra)
    good = st.seed(30)
    backend = CountingBackend()
    daemon = Daemon(make_settings(sb, tmp_path), backends={Backend.MOCK: backend})
    async with running(daemon):
        await wait_until(settled(st, [*good, bad_content, big_v, big_extra]))
    for i in (*good, big_v, big_extra):
        assert st.tasks[i]["state"] == "succeeded", i
    assert st.tasks[bad_content]["state"] == "failed"
    assert "content must be a string" in failed_reasons(st)[bad_content]


async def test_lone_surrogates_fail_their_task_with_a_reason_and_are_never_rewritten(sandbox, tmp_path):
    sb = sandbox
    st = sb.state
    cases = {
        "low": b'"\\udc00"',
        "high_then_text": b'"a\\ud800"',
        "in_dict": b'{"text":"ok \\udfff then","model":"m"}',
        "bad_utf8": b'"caf\xe9 au lait"',
        "bad_model": b'{"text":"fine text","model":"m\\ud800"}',
    }
    st.insert_raw_bytes(b'{"_id":"\\ud800%s","type":"text_embedding","content":"x"}' % ("a" * 23).encode())
    ids = {k: st.new_id() for k in cases}
    for k, content in cases.items():
        st.insert_raw_bytes(entry(ids[k], content), ids[k])
    bad_type = st.new_id()
    st.insert_raw_bytes(entry(bad_type, b'"text"', type_=b'"text_\\udc00embedding"'), bad_type)
    emoji = st.create({"content": "a valid pair: \U0001f600"})["_id"]
    good = st.seed(20)
    backend = CountingBackend()
    daemon = Daemon(make_settings(sb, tmp_path), backends={Backend.MOCK: backend})
    async with running(daemon):
        await wait_until(settled(st, [*good, emoji, *ids.values()]))
        served = polls(st)
        await wait_until(lambda: polls(st) >= served + 2)
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
    tokens = TokenProvider(http, token_config(s), metrics=metrics, guard=Guard("token", BreakerConfig()))
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
async def test_a_body_that_is_not_a_list_is_a_failed_poll(sandbox, tmp_path, kind):
    sb = sandbox
    sb.state.pending_shape = PendingShape(mode="raw", raw=BAD_BODIES[kind], content_type="text/html" if kind == "html" else "application/json")
    async with httpx.AsyncClient() as http:
        api = api_for(sb, tmp_path, http)
        got = []
        with pytest.raises(ApiError) as info:
            async with api.pending() as entries:
                async for e in entries:
                    got.append(e)
        assert getattr(info.value, "fault", None) is not None and info.value.fault.value == "malformed" and info.value.status == 200
        assert api.last_success is None  # an unusable answer is not an answer
        sb.state.calm()
        async with api.pending() as entries:
            assert [e async for e in entries] == []
        assert api.last_success is not None


async def test_readiness_goes_red_while_the_list_is_malformed(sandbox, tmp_path):
    sb = sandbox
    good = sb.state.seed(5)
    sb.state.pending_shape = PendingShape(mode="wrap")
    daemon = Daemon(make_settings(sb, tmp_path), backends={Backend.MOCK: CountingBackend()})
    async with running(daemon):
        await wait_until(lambda: polls(sb.state) >= 3)
        assert any("task API has not answered" in r for r in daemon.not_ready_reasons())
        assert all(sb.state.tasks[i]["state"] == "pending" for i in good)
        sb.state.calm()  # the API heals: work resumes and /ready turns green
        await wait_until(settled(sb.state, good))
        await wait_until(lambda: not any("task API" in r for r in daemon.not_ready_reasons()))


async def test_patch_with_an_unusable_id_is_an_api_error_not_a_crash(sandbox, tmp_path):
    sb = sandbox
    async with httpx.AsyncClient() as http:
        api = api_for(sb, tmp_path, http)
        for bad in ("68b89107952364b0aad89c1d\n", "68b8/../../x", "é" * 24, "\udc00" * 24, "", "68b89107952364b0aad89c1d?x=1"):
            with pytest.raises(ApiError) as info:
                await api.patch(bad, "failed", reason="x")
            assert info.value.status == 400 and not info.value.sent
        assert sb.state.patches == []


async def test_a_stream_that_breaks_off_is_an_api_error(sandbox, tmp_path):
    """The connection drops mid-body: the adapter's own error, never an httpx one."""
    sandbox.state.seed(300)
    sandbox.state.pending_shape = PendingShape(truncate_at=5000)
    async with httpx.AsyncClient() as http:
        api = api_for(sandbox, tmp_path, http)
        got = []
        with pytest.raises(ApiError) as info:
            async with api.pending() as entries:
                async for e in entries:
                    got.append(e)
        assert info.value.kind.value == "retryable" and 0 < len(got) < 300
        assert api.last_success is None


# --- the adapter over generated bodies ---------------------------------------------------

json_leaves = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63 - 2, max_value=2**80)
    | st.integers(min_value=-(2**80), max_value=-(2**63) + 2) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=[]) | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=[]), max_size=8)
)
json_values = st.recursive(json_leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=12)
task_entries = st.fixed_dictionaries(
    {"_id": st.text("0123456789abcdef", min_size=24, max_size=24), "type": st.just("text_embedding"),
     "content": st.one_of(st.text(min_size=1, max_size=20).filter(str.strip), json_values)},
    optional={"__v": json_values, "createdAt": json_values, "x": json_values},
)


def _ok(v) -> bool:
    """A value the reader must give back as it is (valid Unicode, an integer within 64 bits)."""
    if isinstance(v, str):
        return unicode_problem(v) is None
    if isinstance(v, bool) or v is None or isinstance(v, float):
        return True
    if isinstance(v, int):
        return -(2**63) <= v < 2**64
    if isinstance(v, list):
        return all(_ok(x) for x in v)
    return all(_ok(x) for x in v.values())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(task_entries | json_values, max_size=8), st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=10))
async def test_the_api_reads_every_entry_of_any_list_in_any_chunking(tmp_path, entries, sizes):
    """Whatever values a list holds (huge integers, floats, lone surrogates, nesting) and
    however the body is cut into chunks: every entry comes out, in order, valid ones exactly."""
    body = json.dumps(entries).encode()

    async def chunks():
        i = k = 0
        while i < len(body):
            n = sizes[k % len(sizes)]
            yield body[i : i + n]
            i, k = i + n, k + 1

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth2/token":
            return httpx.Response(200, json={"access_token": "tok-abc", "token_type": "bearer", "expires_in": 3600})
        return httpx.Response(200, content=chunks(), headers={"content-type": "application/json"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        settings_ = load_settings({"API_BASE_URL": "http://api.test", "OAUTH2_TOKEN_URL": "http://auth.test/oauth2/token",
                                   "OAUTH2_CLIENT_ID": "c", "OAUTH2_CLIENT_SECRET": "secret", "PROCESSING_MODE": "mock",
                                   "STATE_DIR": str(tmp_path / "s"), "RATE_LIMIT_ENABLED": "false"}, dotenv_path=None)[0]
        metrics = Metrics()
        tokens = TokenProvider(http, token_config(settings_), metrics=metrics, guard=Guard("token", BreakerConfig()))
        api = TaskApi(http, settings_.api_base_url, tokens, metrics=metrics, guard=Guard("api", BreakerConfig()), concurrency=2)
        async with api.pending() as stream:
            got = [e async for e in stream]
    assert len(got) == len(entries)
    for sent, read in zip(entries, got, strict=True):
        if _ok(sent):
            assert read == sent
        orjson.dumps(read, default=str)  # whatever came out can be logged and fingerprinted
        parsed = parse_entry(read, Routing(default_model="m", mock=True))
        if isinstance(parsed, Task):
            assert isinstance(sent, dict) and parsed.id == sent["_id"] and parsed.text == sent["content"]


async def test_deep_nesting_spoils_only_its_own_entry(sandbox, tmp_path):
    """300 levels: JSON parsers read it, but it cannot be serialised again for a log line or a
    fingerprint. The entry is unreadable (logged, counted); the daemon and the rest go on."""
    st = sandbox.state
    deep = b"[" * 300 + b"]" * 300
    st.insert_raw_bytes(deep)
    st.insert_raw_bytes(b'{"no_id": ' + deep + b"}")
    with_id = st.new_id()
    st.insert_raw_bytes(entry(with_id, b'"fine text"', b', "x": ' + deep), with_id)
    good = st.seed(10)
    daemon = Daemon(make_settings(sandbox, tmp_path), backends={Backend.MOCK: CountingBackend()})
    async with running(daemon):
        await wait_until(settled(st, good))
        served = polls(st)
        await wait_until(lambda: polls(st) >= served + 2)
    assert all(st.tasks[i]["state"] == "succeeded" for i in good)
    assert st.tasks[with_id]["state"] == "pending"  # never failed on a guess
    assert daemon.metrics.registry.get_sample_value("ai_tasks_rejected_total", {"reason": "unreadable"}) == 3
