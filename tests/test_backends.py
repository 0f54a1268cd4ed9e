"""OpenAI and Ollama adapters against respx stand-ins for the real servers (CONTRACT.md §3, §4),
and the daemon's handling of each error class end to end (real sandbox, fake backend)."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import pytest
import respx
import trio

from processor.daemon import Daemon, StartupError
from processor.effects.backends.base import EmbedError, EmbedErrorKind
from processor.effects.backends.ollama import ModelUnavailable, OllamaBackend
from processor.effects.backends.openai import OpenAIBackend, accepts_dimensions, parse_reset
from processor.effects.metrics import Metrics
from tests.conftest import all_done, make_settings, running, wait_until

OPENAI = "http://openai.test"
OLLAMA = "http://ollama.test:11434"


def b64(vec: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()


def vec_for(text: str, dim: int) -> list[float]:
    x = (sum(map(ord, text)) % 97 + 1) / 100.0
    return [x] + [0.0] * (dim - 1)


def openai_ok(request: httpx.Request, dim: int = 1024) -> httpx.Response:
    body = json.loads(request.content)
    inputs = body["input"]
    data = [{"object": "embedding", "index": i, "embedding": b64(vec_for(t, body.get("dimensions", dim)))} for i, t in enumerate(inputs)]
    data.reverse()  # the index, not the order, maps a vector to its input
    return httpx.Response(200, json={"object": "list", "data": data, "model": body["model"], "usage": {"prompt_tokens": 7 * len(inputs), "total_tokens": 7 * len(inputs)}},
                          headers={"x-ratelimit-limit-requests": "5000", "x-ratelimit-remaining-requests": "4999", "x-ratelimit-reset-requests": "12ms"})


def openai_backend(metrics: Metrics | None = None, max_batch: int = 64) -> OpenAIBackend:
    return OpenAIBackend(api_key="sk-test-0000000000000000", base_url=OPENAI, dimensions=1024, timeout=5, max_batch=max_batch, metrics=metrics or Metrics())


# --- OpenAI adapter --------------------------------------------------------------------


def test_dimensions_only_for_models_that_accept_it():
    assert accepts_dimensions("text-embedding-3-small") and accepts_dimensions("text-embedding-3-large")
    assert not accepts_dimensions("text-embedding-ada-002") and not accepts_dimensions("nomic-embed-text")
    assert parse_reset("6m0s") == 360 and parse_reset("12ms") == pytest.approx(0.012) and parse_reset("1h2m3.5s") == 3723.5


@respx.mock
async def test_openai_batches_decodes_base64_and_sends_dimensions():
    route = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=openai_ok)
    m = Metrics()
    b = openai_backend(m)
    res = await b.embed("text-embedding-3-small", ["a", "bb", "ccc"])
    await b.aclose()
    sent = json.loads(route.calls[0].request.content)
    assert sent["input"] == ["a", "bb", "ccc"] and sent["dimensions"] == 1024 and sent["encoding_format"] == "base64"
    assert route.calls[0].request.headers["authorization"] == "Bearer sk-test-0000000000000000"
    assert [v[0] for v in res.vectors] == pytest.approx([vec_for(t, 1024)[0] for t in ["a", "bb", "ccc"]])
    assert res.prompt_tokens == 21
    assert m.registry.get_sample_value("openai_tokens_used_total", {"model": "text-embedding-3-small", "type": "prompt"}) == 21


@respx.mock
async def test_openai_no_dimensions_for_older_models():
    route = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=lambda r: openai_ok(r, dim=1536))
    b = openai_backend()
    res = await b.embed("text-embedding-ada-002", ["x"])
    await b.aclose()
    assert "dimensions" not in json.loads(route.calls[0].request.content)
    assert len(res.vectors[0]) == 1536 and b.expected_dim("text-embedding-ada-002") is None


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "quota"),
    [
        (429, {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}, {"retry-after": "2"}, EmbedErrorKind.RATE_LIMITED, False),
        (429, {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}}, {}, EmbedErrorKind.BACKEND_DOWN, True),
        (400, {"error": {"message": "Invalid input", "type": "invalid_request_error", "code": None}}, {}, EmbedErrorKind.INPUT, False),
        (401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}}, {}, EmbedErrorKind.BACKEND_DOWN, False),
        (403, {"error": {"message": "Country not supported", "type": "x", "code": None}}, {}, EmbedErrorKind.BACKEND_DOWN, False),
        (404, {"error": {"message": "The model `nope` does not exist", "type": "x", "code": "model_not_found"}}, {}, EmbedErrorKind.MODEL, False),
        (500, {"error": {"message": "server error", "type": "server_error", "code": None}}, {}, EmbedErrorKind.TRANSIENT, False),
        (503, {"error": {"message": "overloaded", "type": "server_error", "code": None}}, {}, EmbedErrorKind.TRANSIENT, False),
    ],
)
@respx.mock
async def test_openai_error_classes(status, body, headers, kind, quota):
    respx.post(f"{OPENAI}/v1/embeddings").mock(return_value=httpx.Response(status, json=body, headers=headers))
    b = openai_backend()
    with pytest.raises(EmbedError) as info:
        await b.embed("text-embedding-3-small", ["x"])
    await b.aclose()
    assert info.value.kind is kind and info.value.quota is quota
    assert body["error"]["message"] in str(info.value)
    if headers.get("retry-after"):
        assert info.value.retry_after == 2.0
    assert "sk-test" not in str(info.value)


@respx.mock
async def test_openai_connection_error_and_timeout():
    respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=httpx.ConnectError("refused"))
    b = openai_backend()
    with pytest.raises(EmbedError) as info:
        await b.embed("text-embedding-3-small", ["x"])
    assert info.value.kind is EmbedErrorKind.TRANSIENT
    respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(EmbedError) as info:
        await b.embed("text-embedding-3-small", ["x"])
    await b.aclose()
    assert info.value.kind is EmbedErrorKind.TIMEOUT


@respx.mock
async def test_openai_paces_when_the_budget_is_nearly_spent():
    def low(request):
        r = openai_ok(request)
        r.headers["x-ratelimit-remaining-requests"] = "1"
        r.headers["x-ratelimit-reset-requests"] = "1s"
        return r

    respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=low)
    b = openai_backend()
    await b.embed("text-embedding-3-small", ["x"])
    t0 = trio.current_time()
    await b.embed("text-embedding-3-small", ["y"])
    await b.aclose()
    assert trio.current_time() - t0 >= 0.9  # waited for the reset instead of hitting 429


# --- Ollama adapter ----------------------------------------------------------------------


def ollama_backend(models=("nomic-embed-text",), download_timeout=5.0, metrics=None) -> OllamaBackend:
    return OllamaBackend(base_url=OLLAMA, models=list(models), timeout=5, download_timeout=download_timeout, keep_alive="10m",
                         truncate=True, max_batch=64, metrics=metrics or Metrics())


def ollama_embed_ok(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if any("BAD" in t for t in body["input"]):
        return httpx.Response(400, json={"error": "input length exceeds the context length"})
    return httpx.Response(200, json={"model": body["model"], "embeddings": [vec_for(t, 768) for t in body["input"]], "prompt_eval_count": 3 * len(body["input"])})


SHOW_OK = {"capabilities": ["embedding"], "model_info": {"nomic-bert.embedding_length": 768, "nomic-bert.context_length": 2048}}


@respx.mock
async def test_ollama_start_pulls_missing_model_with_progress_and_learns_its_size(captured_logs):
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(200, json={"models": []}))
    lines = [{"status": "pulling manifest"}] + [{"status": "pulling abc", "digest": "abc", "total": 1000, "completed": c} for c in (0, 250, 500, 1000)]
    lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
    pull = respx.post(f"{OLLAMA}/api/pull").mock(return_value=httpx.Response(200, content="\n".join(json.dumps(x) for x in lines).encode()))
    respx.post(f"{OLLAMA}/api/show").mock(return_value=httpx.Response(200, json=SHOW_OK))
    b = ollama_backend()
    await b.start()
    logs = captured_logs
    await b.aclose()
    assert pull.called and json.loads(pull.calls[0].request.content) == {"model": "nomic-embed-text", "stream": True}
    assert b.expected_dim("nomic-embed-text") == 768
    percents = [e["percent"] for e in logs if e["event"] == "ollama_pull_progress"]
    assert percents and percents[-1] == 100


@respx.mock
async def test_ollama_pull_error_line_is_a_clear_start_up_error():
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(200, json={"models": [{"name": "other:latest"}]}))
    body = b'{"status":"pulling manifest"}\n{"error":"pull model manifest: file does not exist"}\n'
    respx.post(f"{OLLAMA}/api/pull").mock(return_value=httpx.Response(200, content=body))
    respx.post(f"{OLLAMA}/api/embed").mock(return_value=httpx.Response(404, json={"error": 'model "nomic-embed-text" not found, try pulling it first'}))
    b = ollama_backend()
    with pytest.raises(ModelUnavailable, match="file does not exist.*probe embedding failed"):
        await b.start()
    await b.aclose()


@respx.mock
async def test_ollama_rejects_a_model_that_does_not_embed():
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(200, json={"models": [{"name": "nomic-embed-text:latest"}]}))
    respx.post(f"{OLLAMA}/api/show").mock(return_value=httpx.Response(200, json={"capabilities": ["completion"], "model_info": {}}))
    b = ollama_backend()
    with pytest.raises(ModelUnavailable, match="not an embedding model"):
        await b.start()
    await b.aclose()


@respx.mock
async def test_ollama_batch_request_and_error_classes():
    route = respx.post(f"{OLLAMA}/api/embed").mock(side_effect=ollama_embed_ok)
    m = Metrics()
    b = ollama_backend(metrics=m)
    res = await b.embed("nomic-embed-text", ["a", "b"])
    sent = json.loads(route.calls[0].request.content)
    assert sent == {"model": "nomic-embed-text", "input": ["a", "b"], "truncate": True, "keep_alive": "10m"}
    assert len(res.vectors) == 2 and res.prompt_tokens == 6
    assert m.registry.get_sample_value("ollama_requests_total", {"model": "nomic-embed-text", "status": "success"}) == 1
    with pytest.raises(EmbedError) as info:
        await b.embed("nomic-embed-text", ["ok", "BAD one"])
    assert info.value.kind is EmbedErrorKind.INPUT
    respx.post(f"{OLLAMA}/api/embed").mock(return_value=httpx.Response(503, json={"error": "server busy, please try again"}))
    with pytest.raises(EmbedError) as info:
        await b.embed("nomic-embed-text", ["x"])
    assert info.value.kind is EmbedErrorKind.TRANSIENT
    respx.post(f"{OLLAMA}/api/embed").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(EmbedError) as info:
        await b.embed("nomic-embed-text", ["x"])
    assert info.value.kind is EmbedErrorKind.TIMEOUT
    await b.aclose()


@respx.mock
async def test_ollama_404_pulls_once_then_fails_the_model():
    respx.post(f"{OLLAMA}/api/embed").mock(return_value=httpx.Response(404, json={"error": 'model "nomic-embed-text" not found, try pulling it first'}))
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(200, json={"models": []}))
    pull = respx.post(f"{OLLAMA}/api/pull").mock(return_value=httpx.Response(200, content=b'{"error":"registry unreachable"}\n'))
    b = ollama_backend()
    with pytest.raises(EmbedError) as info:
        await b.embed("nomic-embed-text", ["x"])
    assert info.value.kind is EmbedErrorKind.MODEL and "could not be pulled" in str(info.value)
    with pytest.raises(EmbedError) as info:
        await b.embed("nomic-embed-text", ["x"])
    assert info.value.kind is EmbedErrorKind.MODEL
    assert pull.call_count == 1  # pulled once, not on every request
    await b.aclose()


# --- the daemon with each error class (real sandbox, respx stands in for the backend) -------


def passthrough_sandbox(sandbox) -> None:
    respx.route(url__startswith=sandbox.url).pass_through()


@respx.mock
async def test_daemon_openai_mode_splits_a_batch_to_fail_only_the_bad_input(sandbox, tmp_path):
    passthrough_sandbox(sandbox)

    def maybe_bad(request):
        body = json.loads(request.content)
        if any("POISON" in t for t in body["input"]):
            return httpx.Response(400, json={"error": {"message": "Invalid input: POISON", "type": "invalid_request_error", "code": None}})
        return openai_ok(request)

    route = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=maybe_bad)
    sandbox.state.seed(30)
    bad = sandbox.state.create({"type": "text_embedding", "content": {"text": "POISON pill", "model": "text-embedding-3-small"}})["_id"]
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="openai", OPENAI_API_KEY="sk-test-0000000000000000", OPENAI_BASE_URL=OPENAI)
    daemon = Daemon(settings, handle_signals=False)
    async with running(daemon):
        await wait_until(all_done(sandbox.state, 31))
    st = sandbox.state
    assert st.tasks[bad]["state"] == "failed"
    assert st.by_state() == {"succeeded": 30, "failed": 1}
    assert len(st.tasks[next(i for i in st.tasks if i != bad)]["result"]) == 1024
    assert route.call_count >= 3  # the whole batch, then halves down to the bad one


@respx.mock
async def test_daemon_honours_retry_after_without_tripping_the_breaker(sandbox, tmp_path):
    passthrough_sandbox(sandbox)
    calls = {"n": 0}

    def limited_first(request):
        calls["n"] += 1
        if calls["n"] <= 2:
            return httpx.Response(429, json={"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}, headers={"retry-after": "0.5"})
        return openai_ok(request)

    respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=limited_first)
    sandbox.state.seed(10)
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="openai", OPENAI_API_KEY="sk-test-0000000000000000", OPENAI_BASE_URL=OPENAI, CIRCUIT_BREAKER_THRESHOLD="1")
    daemon = Daemon(settings, handle_signals=False)
    t0 = trio.current_time()
    async with running(daemon):
        await wait_until(all_done(sandbox.state, 10))
        assert not daemon.rt.backend_guards[next(iter(daemon.rt.backend_guards))].is_open
    assert trio.current_time() - t0 >= 1.0  # waited 0.5 s twice
    assert sandbox.state.by_state() == {"succeeded": 10}


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        (429, {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}, "quota exhausted"),
        (401, {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}, "openai backend circuit breaker open"),
        (403, {"message": "Country, region, or territory not supported", "type": "request_forbidden", "code": None}, "openai backend circuit breaker open"),
    ],
)
@respx.mock
async def test_daemon_whole_backend_errors_release_claims_and_never_fail_tasks(sandbox, tmp_path, status, error, reason):
    passthrough_sandbox(sandbox)
    respx.post(f"{OPENAI}/v1/embeddings").mock(return_value=httpx.Response(status, json={"error": error}))
    sandbox.state.seed(10)
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="openai", OPENAI_API_KEY="sk-test-0000000000000000", OPENAI_BASE_URL=OPENAI)
    daemon = Daemon(settings, handle_signals=False)
    async with running(daemon):
        await wait_until(lambda: any(p.state == "pending" for p in sandbox.state.patches))
        await wait_until(lambda: sandbox.state.by_state().get("in_progress", 0) == 0)
        assert any(reason in r for r in daemon.not_ready_reasons())
        quota = daemon.metrics.registry.get_sample_value("embedding_quota_exhausted", {"backend": "openai"})
        assert quota == (1 if status == 429 else None)
        await trio.sleep(0.5)  # and no claiming while the backend is down
    assert sandbox.state.by_state() == {"pending": 10}  # never failed: the tasks wait for the backend


@respx.mock
async def test_daemon_ollama_mode_model_that_cannot_be_pulled_is_a_start_up_error(sandbox, tmp_path):
    passthrough_sandbox(sandbox)
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(200, json={"models": []}))
    respx.post(f"{OLLAMA}/api/pull").mock(return_value=httpx.Response(200, content=b'{"error":"pull model manifest: file does not exist"}\n'))
    respx.post(f"{OLLAMA}/api/embed").mock(return_value=httpx.Response(404, json={"error": 'model "nomic-embed-text" not found'}))
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="ollama", OLLAMA_BASE_URL=OLLAMA, SUPPORTED_MODELS="nomic-embed-text")
    daemon = Daemon(settings, handle_signals=False)
    with pytest.raises(StartupError, match="file does not exist"):
        await daemon.run()


@respx.mock
async def test_daemon_hybrid_routes_by_model_and_falls_back_only_when_asked(sandbox, tmp_path):
    passthrough_sandbox(sandbox)
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(200, json={"models": [{"name": "nomic-embed-text:latest"}]}))
    respx.post(f"{OLLAMA}/api/show").mock(return_value=httpx.Response(200, json=SHOW_OK))
    ollama = respx.post(f"{OLLAMA}/api/embed").mock(side_effect=ollama_embed_ok)
    oai = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=openai_ok)
    local = sandbox.state.seed(5, model="nomic-embed-text")
    remote = sandbox.state.seed(5, model="text-embedding-3-small", prefix="remote")
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="hybrid", OLLAMA_BASE_URL=OLLAMA, SUPPORTED_MODELS="nomic-embed-text",
                             OPENAI_API_KEY="sk-test-0000000000000000", OPENAI_BASE_URL=OPENAI)
    daemon = Daemon(settings, handle_signals=False)
    async with running(daemon):
        await wait_until(all_done(sandbox.state, 10))
    st = sandbox.state
    assert all(len(st.tasks[i]["result"]) == 768 for i in local)
    assert all(len(st.tasks[i]["result"]) == 1024 for i in remote)
    assert ollama.called and oai.called
    sent_to_openai = [t for c in oai.calls for t in json.loads(c.request.content)["input"]]
    assert all(t.startswith("remote") for t in sent_to_openai)  # no silent cross-model fallback


@respx.mock
async def test_daemon_hybrid_unavailable_model_uses_the_fallback_only_when_configured(sandbox, tmp_path, captured_logs):
    passthrough_sandbox(sandbox)
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(200, json={"models": []}))
    respx.post(f"{OLLAMA}/api/pull").mock(return_value=httpx.Response(200, content=b'{"error":"pull model manifest: file does not exist"}\n'))
    respx.post(f"{OLLAMA}/api/embed").mock(return_value=httpx.Response(404, json={"error": 'model "nomic-embed-text" not found'}))
    oai = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=openai_ok)
    ids = sandbox.state.seed(6, model="nomic-embed-text")
    env = dict(PROCESSING_MODE="hybrid", OLLAMA_BASE_URL=OLLAMA, SUPPORTED_MODELS="nomic-embed-text",
               OPENAI_API_KEY="sk-test-0000000000000000", OPENAI_BASE_URL=OPENAI)
    # without FALLBACK_MODELS: the start goes on (hybrid) and the model's tasks fail with the reason
    daemon = Daemon(make_settings(sandbox, tmp_path / "a", **env), handle_signals=False)
    async with running(daemon):
        await wait_until(all_done(sandbox.state, 6))
    assert sandbox.state.by_state() == {"failed": 6} and not oai.called
    reasons = {p.body.get("error") for p in sandbox.state.patches if p.state == "failed"}
    assert all("unavailable on Ollama" in r and "file does not exist" in r for r in reasons)
    # with it: the same tasks go to the named OpenAI model, logged and counted each time
    for i in ids:
        sandbox.state.tasks[i]["state"] = "pending"
        sandbox.state.pending[i] = None
    daemon = Daemon(make_settings(sandbox, tmp_path / "b", **env, FALLBACK_MODELS='{"nomic-embed-text": "text-embedding-3-small"}'),
                    handle_signals=False)
    async with running(daemon):
        await wait_until(lambda: sandbox.state.by_state().get("succeeded", 0) == 6)
    assert all(json.loads(c.request.content)["model"] == "text-embedding-3-small" for c in oai.calls)
    assert daemon.metrics.registry.get_sample_value("embedding_fallbacks_total", {"model": "nomic-embed-text", "fallback": "text-embedding-3-small"}) == 6
    assert any(e["event"] == "model_fallback" for e in captured_logs)


async def test_mock_vectors_are_deterministic_unit_length_and_distinct():
    from processor.effects.backends.mock import MockBackend

    b = MockBackend(1024)
    one = (await b.embed("m", ["alpha", "beta", "alpha"])).vectors
    again = (await MockBackend(1024).embed("m", ["alpha"])).vectors
    other_model = (await b.embed("n", ["alpha"])).vectors
    assert one[0] == one[2] == again[0] and one[0] != one[1] and one[0] != other_model[0]
    assert all(len(v) == 1024 and abs(sum(x * x for x in v) - 1.0) < 1e-9 for v in one)
    assert len((await MockBackend(16).embed("m", ["x"])).vectors[0]) == 16


@respx.mock
async def test_check_reports_ollama_models_without_pulling():
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(200, json={"models": [{"name": "nomic-embed-text:latest"}]}))
    respx.post(f"{OLLAMA}/api/show").mock(return_value=httpx.Response(200, json=SHOW_OK))
    pull = respx.post(f"{OLLAMA}/api/pull")
    b = ollama_backend(models=("nomic-embed-text", "dengcao/Qwen3-Embedding-0.6B:Q8_0"))
    problems = await b.check_models()
    await b.aclose()
    assert problems == ["dengcao/Qwen3-Embedding-0.6B:Q8_0 is not pulled (the daemon pulls it at start; or run `ollama pull dengcao/Qwen3-Embedding-0.6B:Q8_0`)"]
    assert not pull.called


@respx.mock
async def test_daemon_openai_rate_caps_and_over_long_inputs(sandbox, tmp_path):
    passthrough_sandbox(sandbox)
    route = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=openai_ok)
    long_cjk = sandbox.state.create({"type": "text_embedding", "content": {"text": "語" * 9000, "model": "text-embedding-3-small"}})["_id"]
    sandbox.state.seed(12, model="text-embedding-3-small")  # the long one is oldest: in the first admitted group
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="openai", OPENAI_API_KEY="sk-test-0000000000000000", OPENAI_BASE_URL=OPENAI,
                             RATE_LIMIT_ENABLED="true", OPENAI_RATE_LIMIT_PER_MINUTE="6")
    daemon = Daemon(settings, handle_signals=False)
    async with running(daemon):
        await wait_until(lambda: sum(sandbox.state.by_state().get(k, 0) for k in ("succeeded", "failed")) >= 6)
        await trio.sleep(1.0)
        states = sandbox.state.by_state()
    # OpenAI's own cap: 6 tasks a minute went to OpenAI; the rest wait, pending
    sent = [t for c in route.calls for t in json.loads(c.request.content)["input"]]
    assert len(sent) <= 6 and states.get("pending", 0) >= 6 and states.get("in_progress", 0) == 0
    reason = next(p.body["reason"] for p in sandbox.state.patches if p.task_id == long_cjk and p.state == "failed")
    assert "too long" in reason and "語" * 10 not in "".join(sent)  # failed with a reason, never sent


@respx.mock
async def test_openai_truncate_sends_over_long_inputs_cut(sandbox, tmp_path):
    passthrough_sandbox(sandbox)
    route = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=openai_ok)
    tid = sandbox.state.create({"type": "text_embedding", "content": {"text": "語" * 9000, "model": "text-embedding-3-small"}})["_id"]
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="openai", OPENAI_API_KEY="sk-test-0000000000000000", OPENAI_BASE_URL=OPENAI,
                             OPENAI_TRUNCATE="true")
    daemon = Daemon(settings, handle_signals=False)
    async with running(daemon):
        await wait_until(all_done(sandbox.state, 1))
    assert sandbox.state.tasks[tid]["state"] == "succeeded"
    sent = json.loads(route.calls[0].request.content)["input"][0]
    assert 0 < len(sent) < 9000


@respx.mock
async def test_daemon_unreachable_backend_releases_and_never_fails_tasks(sandbox, tmp_path):
    passthrough_sandbox(sandbox)
    respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=httpx.ConnectError("connection refused"))
    sandbox.state.seed(8, model="text-embedding-3-small")
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="openai", OPENAI_API_KEY="sk-test-0000000000000000", OPENAI_BASE_URL=OPENAI,
                             MAX_RETRIES="1", RETRY_MAX_DELAY_SECONDS="0.05", MAX_TASK_ATTEMPTS="1", CIRCUIT_BREAKER_THRESHOLD="50")
    daemon = Daemon(settings, handle_signals=False)
    async with running(daemon):
        await wait_until(lambda: any(p.state == "pending" for p in sandbox.state.patches))
        await wait_until(lambda: sandbox.state.by_state().get("in_progress", 0) == 0)
        assert any("openai backend circuit breaker open" in r for r in daemon.not_ready_reasons())
    assert sandbox.state.by_state() == {"pending": 8}  # even with MAX_TASK_ATTEMPTS=1: never failed


@respx.mock
async def test_ollama_without_tags_or_show_is_confirmed_by_a_probe_embedding():
    """A proxy or an older server: no /api/tags, no /api/show, but /api/embed works."""
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(404, text="404 page not found"))
    respx.post(f"{OLLAMA}/api/show").mock(return_value=httpx.Response(404, text="404 page not found"))
    respx.post(f"{OLLAMA}/api/embed").mock(side_effect=ollama_embed_ok)
    b = ollama_backend()
    await b.start()
    await b.aclose()
    assert b.expected_dim("nomic-embed-text") == 768


async def test_ollama_start_waits_for_a_server_that_is_still_starting(nursery):
    """Connection refused at first: the start waits (with backoff) instead of failing."""
    import socket

    from processor.sandbox import serve_asgi
    from processor.sandbox.fake_backends import FakeBackendState, FakeEmbeddings
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    b = OllamaBackend(base_url=f"http://127.0.0.1:{port}", models=["nomic-embed-text"], timeout=5, download_timeout=30,
                      keep_alive="5m", truncate=True, max_batch=8, metrics=Metrics())
    stop = trio.Event()

    async def start_server_later():
        await trio.sleep(1.2)
        await nursery.start(lambda task_status: serve_asgi(FakeEmbeddings(FakeBackendState(dim=768)), "127.0.0.1", port, shutdown=stop, task_status=task_status))

    nursery.start_soon(start_server_later)
    await b.start()
    await b.aclose()
    stop.set()
    assert b.expected_dim("nomic-embed-text") == 768
