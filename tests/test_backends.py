"""OpenAI and Ollama adapters against respx stand-ins for the real servers (CONTRACT.md §3, §4):
every answer classified into a `Fault` (a test per row of the table), nothing foreign
escaping; and the daemon's handling of the faults end to end (real sandbox)."""

from __future__ import annotations

import base64
import json
import math
import re
import socket
import struct

import httpx
import pytest
import respx
import trio

from processor.config import ConfigError, load_settings
from processor.daemon import Daemon, StartupError
from processor.effects.backends.base import EmbedError, classify_status, retry_after
from processor.effects.backends.ollama import ModelUnavailable, OllamaBackend, OllamaNotAnswering, keep_alive_wire
from processor.effects.backends.openai import OpenAIBackend, accepts_dimensions, parse_reset
from processor.effects.metrics import Metrics
from processor.pure.faults import Dependency, DependencyError, Fault
from processor.wiring import build_backends
from tests.conftest import all_done, make_settings, running, wait_until

OPENAI = "http://openai.test"
OLLAMA = "http://ollama.test:11434"
KEY = "sk-test-0000000000000000"
MODEL = "text-embedding-3-small"


def b64(vec: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()


def vec_for(text: str, dim: int) -> list[float]:
    x = (sum(map(ord, text)) % 97 + 1) / 100.0
    return [x] + [0.0] * (dim - 1)


def openai_ok(request: httpx.Request, dim: int = 1024, *, ignore_dimensions: bool = False) -> httpx.Response:
    body = json.loads(request.content)
    inputs = body["input"]
    size = dim if ignore_dimensions else body.get("dimensions", dim)
    as_float = body.get("encoding_format") == "float"
    data = [{"object": "embedding", "index": i, "embedding": vec_for(t, size) if as_float else b64(vec_for(t, size))} for i, t in enumerate(inputs)]
    data.reverse()  # the index, not the order, maps a vector to its input
    return httpx.Response(200, json={"object": "list", "data": data, "model": body["model"], "usage": {"prompt_tokens": 7 * len(inputs), "total_tokens": 7 * len(inputs)}},
                          headers={"x-ratelimit-limit-requests": "5000", "x-ratelimit-remaining-requests": "4999", "x-ratelimit-reset-requests": "12ms"})


def openai_backend(metrics: Metrics | None = None, max_batch: int = 64) -> OpenAIBackend:
    return OpenAIBackend(api_key=KEY, base_url=OPENAI, dimensions=1024, timeout=5, max_batch=max_batch, metrics=metrics or Metrics())


async def openai_fault(**mock) -> EmbedError:
    """The EmbedError one `embed` of two inputs raises against an OpenAI answering `mock`."""
    respx.post(f"{OPENAI}/v1/embeddings").mock(**mock)
    b = openai_backend()
    try:
        with pytest.raises(EmbedError) as info:
            await b.embed(MODEL, ["x", "y"])
    finally:
        await b.aclose()
    return info.value


def openai_error(status: int, message: str, *, code: str | None = None, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": type_, "param": param, "code": code}}, headers=headers or {})


# --- the vocabulary -----------------------------------------------------------------------


def test_embed_error_is_a_dependency_error_of_the_embedding_dependency():
    exc = EmbedError("x", Fault.PARAMETER, status=400, param="dimensions")
    assert isinstance(exc, DependencyError) and exc.dependency is Dependency.EMBEDDING
    assert exc.fault is exc.kind is Fault.PARAMETER and exc.param == "dimensions" and exc.status == 400


def test_dimensions_only_for_models_that_accept_it():
    assert accepts_dimensions("text-embedding-3-small") and accepts_dimensions("text-embedding-3-large")
    assert not accepts_dimensions("text-embedding-ada-002") and not accepts_dimensions("nomic-embed-text")
    assert parse_reset("6m0s") == 360 and parse_reset("12ms") == pytest.approx(0.012) and parse_reset("1h2m3.5s") == 3723.5


def test_retry_after_reads_seconds_milliseconds_and_dates_and_ignores_junk():
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert retry_after({"retry-after": "soon"}) is None and retry_after({"retry-after": "nan"}) is None and retry_after({}) is None


# --- OpenAI adapter: a good answer ----------------------------------------------------------


@respx.mock
async def test_openai_batches_decodes_base64_and_sends_dimensions():
    route = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=openai_ok)
    m = Metrics()
    b = openai_backend(m)
    res = await b.embed(MODEL, ["a", "bb", "ccc"])
    await b.aclose()
    sent = json.loads(route.calls[0].request.content)
    assert sent["input"] == ["a", "bb", "ccc"] and sent["dimensions"] == 1024 and sent["encoding_format"] == "base64"
    assert route.calls[0].request.headers["authorization"] == f"Bearer {KEY}"
    assert [v[0] for v in res.vectors] == pytest.approx([vec_for(t, 1024)[0] for t in ["a", "bb", "ccc"]])
    assert all(len(v) == 1024 for v in res.vectors)
    assert res.prompt_tokens == 21
    assert m.registry.get_sample_value("openai_tokens_used_total", {"model": MODEL, "type": "prompt"}) == 21


@respx.mock
async def test_openai_no_dimensions_for_older_models_and_their_size_is_learnt():
    route = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=lambda r: openai_ok(r, dim=1536))
    b = openai_backend()
    res = await b.embed("text-embedding-ada-002", ["x"])
    assert "dimensions" not in json.loads(route.calls[0].request.content)
    assert len(res.vectors[0]) == 1536 and b.expected_dim("text-embedding-ada-002") == 1536
    respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=lambda r: openai_ok(r, dim=768))
    with pytest.raises(EmbedError) as info:  # the same model answering another size later
        await b.embed("text-embedding-ada-002", ["x"])
    await b.aclose()
    assert info.value.fault is Fault.DIMENSION


@respx.mock
async def test_openai_server_without_base64_is_asked_for_floats():
    def no_base64(request):
        if json.loads(request.content)["encoding_format"] == "base64":
            return openai_error(400, "encoding_format base64 is not supported", param="encoding_format")
        return openai_ok(request)

    route = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=no_base64)
    b = openai_backend()
    first = await b.embed(MODEL, ["a", "b"])
    second = await b.embed(MODEL, ["c"])
    await b.aclose()
    assert len(first.vectors) == 2 and len(second.vectors[0]) == 1024
    assert [json.loads(c.request.content)["encoding_format"] for c in route.calls] == ["base64", "float", "float"]


# --- OpenAI adapter: every error answer, one test per row -----------------------------------

OPENAI_ERROR_ROWS = [
    # id, response, fault, param, retry_after
    ("400-param-dimensions", openai_error(400, "This model does not support specifying dimensions.", param="dimensions"), Fault.PARAMETER, "dimensions", None),
    ("400-param-encoding_format-after-float", None, Fault.PARAMETER, "encoding_format", None),  # see below
    ("400-matryoshka-range", openai_error(400, "matryoshka_dim=1024 is not in a valid range"), Fault.PARAMETER, "dimensions", None),
    ("400-unrecognized-argument", openai_error(400, "Unrecognized request argument supplied: dimensions"), Fault.PARAMETER, "dimensions", None),
    ("400-unknown-parameter", openai_error(400, "Unknown parameter: 'user_tag'."), Fault.PARAMETER, "user_tag", None),
    ("422-extra-field", httpx.Response(422, json={"detail": [{"type": "extra_forbidden", "loc": ["body", "dimensions"], "msg": "Extra inputs are not permitted"}]}),
     Fault.PARAMETER, "dimensions", None),
    ("400-param-input", openai_error(400, "Invalid 'input[1]': string too long.", param="input"), Fault.INPUT, None, None),
    ("400-context-length", openai_error(400, "This model's maximum context length is 8192 tokens, however you requested 9000 tokens."), Fault.INPUT, None, None),
    ("400-param-model", openai_error(400, "invalid model ID", param="model"), Fault.MODEL_MISSING, None, None),
    ("401", openai_error(401, "Incorrect API key provided: sk-test-****0000.", code="invalid_api_key"), Fault.AUTH, None, None),
    ("403", openai_error(403, "Country, region, or territory not supported", type_="request_forbidden"), Fault.AUTH, None, None),
    ("404-model", openai_error(404, "The model `nope` does not exist or you do not have access to it.", code="model_not_found"), Fault.MODEL_MISSING, None, None),
    ("404-no-such-endpoint", httpx.Response(404, text="<html><body>404 page not found</body></html>"), Fault.PARAMETER, "base_url", None),
    ("408", openai_error(408, "request timeout"), Fault.TIMEOUT, None, None),
    ("429-quota", openai_error(429, "You exceeded your current quota, please check your plan and billing details.", code="insufficient_quota", type_="insufficient_quota"),
     Fault.QUOTA, None, None),
    ("429-rate-limit", openai_error(429, "Rate limit reached for requests", code="rate_limit_exceeded", type_="requests", headers={"retry-after": "2"}),
     Fault.RATE_LIMITED, None, 2.0),
    ("429-rate-limit-ms", openai_error(429, "Rate limit reached for tokens", code="rate_limit_exceeded", type_="tokens", headers={"retry-after-ms": "250"}),
     Fault.RATE_LIMITED, None, 0.25),
    ("500", openai_error(500, "The server had an error while processing your request.", type_="server_error"), Fault.SERVER, None, None),
    ("502-html", httpx.Response(502, text="<html>Bad Gateway</html>"), Fault.SERVER, None, None),
    ("503", openai_error(503, "The engine is currently overloaded, please try again later", type_="server_error"), Fault.BUSY, None, None),
    ("504", httpx.Response(504, text="Gateway Timeout"), Fault.TIMEOUT, None, None),
]


@pytest.mark.parametrize(("response", "fault", "param", "wait"), [r[1:] for r in OPENAI_ERROR_ROWS], ids=[r[0] for r in OPENAI_ERROR_ROWS])
@respx.mock
async def test_openai_error_answer_is_classified(response, fault, param, wait):
    if response is None:  # a server refusing encoding_format even as float
        response = openai_error(400, "encoding_format must be one of: float", param="encoding_format")
    exc = await openai_fault(return_value=response)
    assert exc.fault is fault and exc.param == param and exc.retry_after == wait and exc.status == response.status_code
    assert str(exc).startswith(f"OpenAI {response.status_code}: ") and "\n" not in str(exc)
    assert KEY not in str(exc)


@respx.mock
async def test_openai_parameter_fault_names_the_setting_to_change():
    exc = await openai_fault(return_value=openai_error(400, "matryoshka_dim=1024 is not in a valid range"))
    assert "matryoshka_dim=1024" in str(exc) and "EMBEDDING_DIMENSIONS" in str(exc)
    exc = await openai_fault(return_value=httpx.Response(404, text="404 page not found"))
    assert "OPENAI_BASE_URL" in str(exc)


@respx.mock
async def test_openai_key_never_in_the_message():
    exc = await openai_fault(return_value=openai_error(401, f"Incorrect API key provided: {KEY}", code="invalid_api_key"))
    assert exc.fault is Fault.AUTH and KEY not in str(exc) and "OPENAI_API_KEY" in str(exc)


TRANSPORT_ROWS = [
    ("connect-refused", httpx.ConnectError("refused"), Fault.UNREACHABLE),
    ("reset", httpx.RemoteProtocolError("peer closed connection"), Fault.UNREACHABLE),
    ("read-timeout", httpx.ReadTimeout("slow"), Fault.TIMEOUT),
    ("connect-timeout", httpx.ConnectTimeout("slow"), Fault.TIMEOUT),
    ("anything-else", RuntimeError("a bug in a proxy library"), Fault.UNREACHABLE),
]


@pytest.mark.parametrize(("error", "fault"), [r[1:] for r in TRANSPORT_ROWS], ids=[r[0] for r in TRANSPORT_ROWS])
@respx.mock
async def test_openai_no_answer_is_classified(error, fault):
    exc = await openai_fault(side_effect=error)
    assert exc.fault is fault and exc.status is None


def _data(*embeddings: object) -> dict[str, object]:
    return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(embeddings)], "model": MODEL}


GOOD = b64([0.5] * 1024)
OPENAI_MALFORMED_ROWS = [
    ("html-200", httpx.Response(200, text="<html><body>Welcome to nginx!</body></html>", headers={"content-type": "text/html"})),
    ("empty-200", httpx.Response(200, content=b"")),
    ("json-without-data", httpx.Response(200, json={"object": "list", "model": MODEL})),
    ("data-null", httpx.Response(200, json={"object": "list", "data": None})),
    ("body-a-list", httpx.Response(200, json=[GOOD, GOOD])),
    ("one-vector-for-two", httpx.Response(200, json=_data(GOOD))),
    ("three-vectors-for-two", httpx.Response(200, json=_data(GOOD, GOOD, GOOD))),
    ("index-missing", httpx.Response(200, json={"data": [{"embedding": GOOD}, {"embedding": GOOD}]})),
    ("index-twice", httpx.Response(200, json={"data": [{"index": 0, "embedding": GOOD}, {"index": 0, "embedding": GOOD}]})),
    ("index-out-of-range", httpx.Response(200, json={"data": [{"index": 0, "embedding": GOOD}, {"index": 7, "embedding": GOOD}]})),
    ("embedding-null", httpx.Response(200, json=_data(GOOD, None))),
    ("embedding-a-number", httpx.Response(200, json=_data(GOOD, 3))),
    ("embedding-empty", httpx.Response(200, json=_data(GOOD, []))),
    ("float-list-with-a-string", httpx.Response(200, json=_data([0.1] * 1024, [0.1] * 1023 + ["x"]))),
    ("float-list-with-a-bool", httpx.Response(200, json=_data([0.1] * 1024, [True] * 1024))),
    ("base64-not-base64", httpx.Response(200, json=_data(GOOD, "not base64 at all!"))),
    ("base64-wrong-length", httpx.Response(200, json=_data(GOOD, base64.b64encode(b"\x00" * 4095).decode()))),
    ("base64-nan", httpx.Response(200, json=_data(GOOD, b64([math.nan] + [0.0] * 1023)))),
    ("base64-mixed-sizes", httpx.Response(200, json=_data(GOOD, b64([0.5] * 1023)))),
]


@pytest.mark.parametrize("response", [r[1] for r in OPENAI_MALFORMED_ROWS], ids=[r[0] for r in OPENAI_MALFORMED_ROWS])
@respx.mock
async def test_openai_malformed_answer_is_malformed(response):
    m = Metrics()
    respx.post(f"{OPENAI}/v1/embeddings").mock(return_value=response)
    b = openai_backend(m)
    with pytest.raises(EmbedError) as info:
        await b.embed(MODEL, ["x", "y"])
    await b.aclose()
    assert info.value.fault is Fault.MALFORMED and "malformed" in str(info.value)
    assert m.registry.get_sample_value("openai_requests_total", {"model": MODEL, "status": "malformed"}) == 1


@respx.mock
async def test_openai_server_ignoring_dimensions_is_a_dimension_fault_naming_the_setting():
    """An OpenAI-compatible server that ignores `dimensions` (384 for every input)."""
    exc = await openai_fault(side_effect=lambda r: openai_ok(r, dim=384, ignore_dimensions=True))
    assert exc.fault is Fault.DIMENSION
    assert "384" in str(exc) and "1024" in str(exc) and "EMBEDDING_DIMENSIONS=384" in str(exc)


@respx.mock
async def test_openai_paces_when_the_budget_is_nearly_spent(autojump_clock):
    def low(request):
        r = openai_ok(request)
        r.headers["x-ratelimit-remaining-requests"] = "0"
        r.headers["x-ratelimit-reset-requests"] = "1s"
        return r

    respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=low)
    b = openai_backend()
    await b.embed(MODEL, ["x"])
    t0 = trio.current_time()
    await b.embed(MODEL, ["y"])
    await b.aclose()
    assert trio.current_time() - t0 >= 1.0  # waited for the reset instead of hitting 429


# --- Ollama adapter --------------------------------------------------------------------------

SHOW_OK = {"capabilities": ["embedding"], "model_info": {"nomic-bert.embedding_length": 768, "nomic-bert.context_length": 2048}}
GO_DURATION = re.compile(r"[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+|0")


def ollama_backend(models=("nomic-embed-text",), download_timeout=5.0, metrics=None, keep_alive="10m", strict=True) -> OllamaBackend:
    return OllamaBackend(base_url=OLLAMA, models=list(models), timeout=5, download_timeout=download_timeout, keep_alive=keep_alive,
                         truncate=True, max_batch=64, metrics=metrics or Metrics(), strict=strict)


def ollama_embed_ok(request: httpx.Request, dim: int = 768) -> httpx.Response:
    """Like Ollama: keep_alive through Go's duration parser, one bad input fails the batch."""
    body = json.loads(request.content)
    keep = body.get("keep_alive")
    if isinstance(keep, str) and not GO_DURATION.fullmatch(keep):
        return httpx.Response(400, json={"error": f'time: missing unit in duration "{keep}"'})
    if any("BAD" in t for t in body["input"]):
        return httpx.Response(400, json={"error": "the input length exceeds the context length"})
    return httpx.Response(200, json={"model": body["model"], "embeddings": [vec_for(t, dim) for t in body["input"]], "prompt_eval_count": 3 * len(body["input"])})


def ollama_up(embed=ollama_embed_ok, *, tags=("nomic-embed-text:latest",), show=SHOW_OK) -> respx.Route:
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(200, json={"models": [{"name": n} for n in tags]}))
    respx.post(f"{OLLAMA}/api/show").mock(return_value=httpx.Response(200, json=show))
    route = respx.post(f"{OLLAMA}/api/embed")
    return route.mock(return_value=embed) if isinstance(embed, httpx.Response) else route.mock(side_effect=embed)


async def ollama_fault(answer) -> EmbedError:
    ollama_up(answer)
    b = ollama_backend()
    try:
        with pytest.raises(EmbedError) as info:
            await b.embed("nomic-embed-text", ["x", "y"])
    finally:
        await b.aclose()
    return info.value


@respx.mock
async def test_ollama_batch_request_body_and_metrics():
    route = ollama_up()
    m = Metrics()
    b = ollama_backend(metrics=m)
    res = await b.embed("nomic-embed-text", ["a", "b"])
    await b.aclose()
    sent = json.loads(route.calls[0].request.content)
    assert sent == {"model": "nomic-embed-text", "input": ["a", "b"], "truncate": True, "keep_alive": "10m"}
    assert [len(v) for v in res.vectors] == [768, 768] and res.prompt_tokens == 6
    assert m.registry.get_sample_value("ollama_requests_total", {"model": "nomic-embed-text", "status": "success"}) == 1


OLLAMA_ERROR_ROWS = [
    ("400-context-length", httpx.Response(400, json={"error": "the input length exceeds the context length"}), Fault.INPUT, None),
    ("400-keep-alive-duration", httpx.Response(400, json={"error": 'time: missing unit in duration "-1"'}), Fault.PARAMETER, "keep_alive"),
    ("400-dimensions", httpx.Response(400, json={"error": "invalid dimensions: 1024 is larger than the model's 768"}), Fault.PARAMETER, "dimensions"),
    ("400-not-an-embedding-model", httpx.Response(400, json={"error": '"llama3.2" does not support embeddings'}), Fault.MODEL_MISSING, None),
    ("401-proxy", httpx.Response(401, text="Unauthorized"), Fault.AUTH, None),
    ("403-proxy", httpx.Response(403, json={"error": "forbidden"}), Fault.AUTH, None),
    ("404-no-such-endpoint", httpx.Response(404, text="404 page not found"), Fault.PARAMETER, "base_url"),
    ("429", httpx.Response(429, json={"error": "too many requests"}, headers={"retry-after": "3"}), Fault.RATE_LIMITED, None),
    ("500", httpx.Response(500, json={"error": "llama runner process has terminated: signal: killed"}), Fault.SERVER, None),
    ("500-busy", httpx.Response(500, json={"error": "server busy, please try again.  maximum pending requests exceeded"}), Fault.BUSY, None),
    ("503-queue-full", httpx.Response(503, json={"error": "server busy, please try again.  maximum pending requests exceeded"}), Fault.BUSY, None),
    ("503-empty", httpx.Response(503), Fault.BUSY, None),
    ("502-html", httpx.Response(502, text="<html>Bad Gateway</html>"), Fault.SERVER, None),
]


@pytest.mark.parametrize(("response", "fault", "param"), [r[1:] for r in OLLAMA_ERROR_ROWS], ids=[r[0] for r in OLLAMA_ERROR_ROWS])
@respx.mock
async def test_ollama_error_answer_is_classified(response, fault, param):
    exc = await ollama_fault(response)
    assert exc.fault is fault and exc.param == param and exc.status == response.status_code
    assert str(exc).startswith(f"Ollama {response.status_code}") and "\n" not in str(exc)
    if fault is Fault.RATE_LIMITED:
        assert exc.retry_after == 3.0
    if param == "keep_alive":
        assert "OLLAMA_KEEP_ALIVE" in str(exc)


@pytest.mark.parametrize(("error", "fault"), [r[1:] for r in TRANSPORT_ROWS], ids=[r[0] for r in TRANSPORT_ROWS])
@respx.mock
async def test_ollama_no_answer_is_classified(error, fault):
    exc = await ollama_fault(error)
    assert exc.fault is fault and exc.status is None


OLLAMA_MALFORMED_ROWS = [
    ("embeddings-null", httpx.Response(200, json={"model": "nomic-embed-text", "embeddings": None})),
    ("embeddings-missing", httpx.Response(200, json={"model": "nomic-embed-text"})),
    ("embeddings-a-string", httpx.Response(200, json={"embeddings": "[[0.1]]"})),
    ("html-200", httpx.Response(200, text="<html>It works!</html>", headers={"content-type": "text/html"})),
    ("body-a-list", httpx.Response(200, json=[[0.1] * 768, [0.1] * 768])),
    ("one-vector-for-two", httpx.Response(200, json={"embeddings": [[0.1] * 768]})),
    ("vector-null", httpx.Response(200, json={"embeddings": [[0.1] * 768, None]})),
    ("vector-of-strings", httpx.Response(200, json={"embeddings": [[0.1] * 768, ["0.1"] * 768]})),
    ("vector-empty", httpx.Response(200, json={"embeddings": [[0.1] * 768, []]})),
    ("vector-overflows-to-inf", httpx.Response(200, content=b'{"embeddings": [[1e999], [0.1]]}')),
    ("mixed-sizes", httpx.Response(200, json={"embeddings": [[0.1] * 768, [0.1] * 767]})),
    ("truncated-json", httpx.Response(200, content=b'{"embeddings": [[0.1, 0.2')),
]


@pytest.mark.parametrize("response", [r[1] for r in OLLAMA_MALFORMED_ROWS], ids=[r[0] for r in OLLAMA_MALFORMED_ROWS])
@respx.mock
async def test_ollama_malformed_answer_is_malformed(response):
    exc = await ollama_fault(response)
    assert exc.fault is Fault.MALFORMED and "malformed" in str(exc)


@respx.mock
async def test_ollama_vectors_of_another_size_than_declared_are_a_dimension_fault():
    exc = await ollama_fault(lambda r: ollama_embed_ok(r, dim=384))  # /api/show says 768
    assert exc.fault is Fault.DIMENSION and "384" in str(exc) and "768" in str(exc)


@respx.mock
async def test_ollama_404_pulls_once_then_the_model_is_missing_and_named():
    ollama_up(httpx.Response(404, json={"error": 'model "nomic-embed-text" not found, try pulling it first'}), tags=())
    pull = respx.post(f"{OLLAMA}/api/pull").mock(return_value=httpx.Response(200, content=b'{"error":"registry unreachable"}\n'))
    b = ollama_backend()
    with pytest.raises(EmbedError) as info:
        await b.embed("nomic-embed-text", ["x"])
    assert info.value.fault is Fault.MODEL_MISSING and "registry unreachable" in str(info.value)
    with pytest.raises(EmbedError) as info:
        await b.embed("nomic-embed-text", ["x"])
    assert info.value.fault is Fault.MODEL_MISSING
    assert pull.call_count == 1  # pulled once, not on every request
    assert set(b.unavailable) == {"nomic-embed-text"} and "registry unreachable" in b.unavailable["nomic-embed-text"]
    await b.aclose()


@respx.mock
async def test_ollama_model_deleted_after_start_is_pulled_again_once_and_served():
    calls = {"n": 0}

    def deleted_once(request):
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx.Response(404, json={"error": 'model "nomic-embed-text" not found, try pulling it first'})
        return ollama_embed_ok(request)

    ollama_up(deleted_once)
    pull = respx.post(f"{OLLAMA}/api/pull").mock(return_value=httpx.Response(200, content=b'{"status":"success"}\n'))
    b = ollama_backend()
    await b.start()
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(200, json={"models": []}))  # deleted by hand
    res = await b.embed("nomic-embed-text", ["x"])  # 404, pull, asked again
    await b.aclose()
    assert len(res.vectors) == 1 and pull.call_count == 1 and not b.unavailable


# --- Ollama: start, pull, wait: nothing foreign escapes ---------------------------------------


@respx.mock
async def test_ollama_start_pulls_missing_model_with_progress_and_learns_its_size(captured_logs):
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(200, json={"models": []}))
    lines = [{"status": "pulling manifest"}] + [{"status": "pulling abc", "digest": "abc", "total": 1000, "completed": c} for c in (0, 250, 500, 1000)]
    lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
    body = "\n".join(json.dumps(x) for x in lines).replace('{"status": "verifying', '5\n"noise"\n[1]\nnot json\n{"status": "verifying')
    pull = respx.post(f"{OLLAMA}/api/pull").mock(return_value=httpx.Response(200, content=body.encode()))
    respx.post(f"{OLLAMA}/api/show").mock(return_value=httpx.Response(200, json=SHOW_OK))
    b = ollama_backend()
    await b.start()
    await b.aclose()
    assert pull.called and json.loads(pull.calls[0].request.content) == {"model": "nomic-embed-text", "stream": True}
    assert b.expected_dim("nomic-embed-text") == 768 and not b.unavailable
    percents = [e["percent"] for e in captured_logs if e["event"] == "ollama_pull_progress"]
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
async def test_ollama_pull_cut_mid_stream_is_not_answering_not_an_httpx_error():
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(200, json={"models": []}))
    respx.post(f"{OLLAMA}/api/pull").mock(side_effect=httpx.RemoteProtocolError("peer closed connection without sending complete message body"))
    b = ollama_backend()
    with pytest.raises(OllamaNotAnswering, match="interrupted"):
        await b.pull("nomic-embed-text")
    await b.aclose()


@respx.mock
async def test_ollama_rejects_a_model_that_does_not_embed():
    ollama_up(show={"capabilities": ["completion"], "model_info": {}})
    b = ollama_backend()
    with pytest.raises(ModelUnavailable, match="not an embedding model"):
        await b.start()
    await b.aclose()


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


@pytest.mark.parametrize("tags", [httpx.Response(200, text="<html>proxy</html>"), httpx.Response(200, json=[1, 2]), httpx.Response(200, json={"models": "x"})],
                         ids=["html", "a-list", "models-not-a-list"])
@respx.mock
async def test_ollama_tags_garbage_falls_back_to_the_probe(tags):
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=tags)
    respx.post(f"{OLLAMA}/api/show").mock(return_value=httpx.Response(200, text="garbage"))
    respx.post(f"{OLLAMA}/api/embed").mock(side_effect=ollama_embed_ok)
    b = ollama_backend()
    await b.start()
    await b.aclose()
    assert b.expected_dim("nomic-embed-text") == 768


@respx.mock
async def test_ollama_start_wait_gives_up_with_its_own_error(autojump_clock):
    tags = respx.get(f"{OLLAMA}/api/tags").mock(side_effect=RuntimeError("not an httpx error"))
    b = ollama_backend(download_timeout=5)
    t0 = trio.current_time()
    with pytest.raises(OllamaNotAnswering, match="unreachable.*OLLAMA_BASE_URL"):
        await b.start()
    await b.aclose()
    assert tags.call_count >= 2 and trio.current_time() - t0 <= 5  # waited, bounded by the download timeout


@respx.mock
async def test_ollama_probe_and_check_never_leak_foreign_errors():
    respx.get(f"{OLLAMA}/api/tags").mock(side_effect=httpx.ConnectError("refused"))
    b = ollama_backend()
    with pytest.raises(EmbedError) as info:
        await b.probe("nomic-embed-text")
    assert info.value.fault is Fault.UNREACHABLE
    assert ["unreachable" in p for p in await b.check_models()] == [True]
    await b.aclose()


async def test_ollama_start_waits_for_a_server_that_is_still_starting(nursery):
    """Connection refused at first: the start waits (with backoff) instead of failing."""
    port = free_port()
    b = OllamaBackend(base_url=f"http://127.0.0.1:{port}", models=["nomic-embed-text"], timeout=5, download_timeout=30,
                      keep_alive="5m", truncate=True, max_batch=8, metrics=Metrics())
    stop = trio.Event()

    async def start_server_later():
        await trio.sleep(1.2)
        await serve_fake_ollama(nursery, port, stop)

    nursery.start_soon(start_server_later)
    await b.start()
    await b.aclose()
    stop.set()
    assert b.expected_dim("nomic-embed-text") == 768


@respx.mock
async def test_ollama_not_up_at_start_in_hybrid_is_rechecked_in_the_background(autojump_clock):
    tags = respx.get(f"{OLLAMA}/api/tags").mock(side_effect=httpx.ConnectError("refused"))
    b = ollama_backend(strict=False, download_timeout=2)
    await b.start()  # hybrid: waits, then goes on
    assert "unreachable" in b.unavailable["nomic-embed-text"] and b.down is not None
    with pytest.raises(EmbedError) as info:
        await b.embed("nomic-embed-text", ["x"])
    assert info.value.fault is Fault.UNREACHABLE  # never MODEL_MISSING for a server that is down
    ollama_up()
    async with trio.open_nursery() as n:
        n.start_soon(lambda: b.maintain(interval=10))
        await trio.sleep(11)
        n.cancel_scope.cancel()
    assert not b.unavailable and b.down is None and b.expected_dim("nomic-embed-text") == 768
    assert tags.call_count >= 2
    await b.aclose()


@respx.mock
async def test_ollama_model_pulled_by_hand_is_noticed_by_the_recheck(autojump_clock):
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(200, json={"models": []}))
    pull = respx.post(f"{OLLAMA}/api/pull").mock(return_value=httpx.Response(200, content=b'{"error":"registry unreachable"}\n'))
    respx.post(f"{OLLAMA}/api/embed").mock(return_value=httpx.Response(404, json={"error": 'model "nomic-embed-text" not found'}))
    b = ollama_backend(strict=False)
    await b.start()
    assert "registry unreachable" in b.unavailable["nomic-embed-text"]
    await b.recheck()  # still not there: no second pull
    assert pull.call_count == 1 and "nomic-embed-text" in b.unavailable
    ollama_up()  # someone ran `ollama pull`
    await b.recheck()
    assert not b.unavailable and pull.call_count == 1
    assert len((await b.embed("nomic-embed-text", ["x"])).vectors) == 1
    await b.aclose()


@respx.mock
async def test_check_reports_ollama_models_without_pulling():
    ollama_up()
    pull = respx.post(f"{OLLAMA}/api/pull")
    b = ollama_backend(models=("nomic-embed-text", "dengcao/Qwen3-Embedding-0.6B:Q8_0"))
    problems = await b.check_models()
    await b.aclose()
    assert problems == ["dengcao/Qwen3-Embedding-0.6B:Q8_0 is not pulled (the daemon pulls it at start; or run `ollama pull dengcao/Qwen3-Embedding-0.6B:Q8_0`)"]
    assert not pull.called


# --- OLLAMA_KEEP_ALIVE --------------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "sent"), [("-1", -1), ("0", 0), ("300", 300), ("5m", "5m"), ("1h", "1h"), ("1h30m", "1h30m"), ("-1m", "-1m")])
@respx.mock
async def test_keep_alive_goes_out_as_ollama_parses_it(sandbox, tmp_path, setting, sent):
    route = ollama_up()
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="ollama", OLLAMA_BASE_URL=OLLAMA, SUPPORTED_MODELS="nomic-embed-text",
                             OLLAMA_KEEP_ALIVE=setting)
    b = build_backends(settings, Metrics())
    adapter = next(iter(b.values()))
    res = await adapter.embed("nomic-embed-text", ["x"])  # the fake parses keep_alive as Ollama does
    await adapter.aclose()
    assert len(res.vectors) == 1
    got = json.loads(route.calls[0].request.content)["keep_alive"]
    assert got == sent and type(got) is type(sent)


@pytest.mark.parametrize("junk", ["forever", "5 minutes", "1.5", "m", "5mm", "-"])
def test_keep_alive_junk_is_a_clear_configuration_error(junk):
    env = {"API_BASE_URL": "http://api.test", "OAUTH2_TOKEN_URL": "http://api.test/token", "OAUTH2_CLIENT_ID": "a", "OAUTH2_CLIENT_SECRET": "b",
           "PROCESSING_MODE": "ollama", "OLLAMA_KEEP_ALIVE": junk}
    with pytest.raises(ConfigError) as info:
        load_settings(env, dotenv_path=None)
    assert "OLLAMA_KEEP_ALIVE" in str(info.value) and "-1 keeps the model loaded" in str(info.value)


def test_keep_alive_wire_form():
    assert keep_alive_wire("-1") == -1 and keep_alive_wire(" 0 ") == 0 and keep_alive_wire("5m") == "5m" and keep_alive_wire(30) == 30


@respx.mock
async def test_daemon_keep_alive_minus_one_keeps_the_model_loaded_and_tasks_succeed(sandbox, tmp_path):
    """Regression (#11): `-1` went out as the string "-1", Ollama refused it, every task failed."""
    passthrough_sandbox(sandbox)
    route = ollama_up()
    sandbox.state.seed(6, model="nomic-embed-text")
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="ollama", OLLAMA_BASE_URL=OLLAMA, SUPPORTED_MODELS="nomic-embed-text",
                             OLLAMA_KEEP_ALIVE="-1")
    async with running(Daemon(settings)):
        await wait_until(all_done(sandbox.state, 6))
    assert sandbox.state.by_state() == {"succeeded": 6}
    assert {json.loads(c.request.content)["keep_alive"] for c in route.calls} == {-1}


# --- the daemon with each fault (real sandbox, respx stands in for the backend) ---------------


def passthrough_sandbox(sandbox) -> None:
    respx.route(url__startswith=sandbox.url).pass_through()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def serve_fake_ollama(nursery, port: int, stop: trio.Event, dim: int = 768) -> None:
    from processor.sandbox import serve_asgi
    from processor.sandbox.fake_backends import FakeBackendState, FakeEmbeddings

    await nursery.start(lambda task_status: serve_asgi(FakeEmbeddings(FakeBackendState(dim=dim, base=0.0, per_input=0.0)), "127.0.0.1", port,
                                                       shutdown=stop, task_status=task_status))


def openai_settings(sandbox, tmp_path, **extra):
    return make_settings(sandbox, tmp_path, PROCESSING_MODE="openai", OPENAI_API_KEY=KEY, OPENAI_BASE_URL=OPENAI, **extra)


def failed(sandbox) -> list[str]:
    return [p.task_id for p in sandbox.state.patches if p.state == "failed"]


def released_or_failed(sandbox) -> bool:
    """A claim went back to pending, or (the defect) a task was failed; nothing in progress."""
    st = sandbox.state
    return any(p.state in ("pending", "failed") for p in st.patches) and st.by_state().get("in_progress", 0) == 0


@respx.mock
async def test_daemon_openai_mode_splits_a_batch_to_fail_only_the_bad_input(sandbox, tmp_path):
    passthrough_sandbox(sandbox)

    def maybe_bad(request):
        body = json.loads(request.content)
        if any("POISON" in t for t in body["input"]):
            return openai_error(400, "Invalid 'input': POISON", param="input")
        return openai_ok(request)

    route = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=maybe_bad)
    sandbox.state.seed(30)
    bad = sandbox.state.create({"type": "text_embedding", "content": {"text": "POISON pill", "model": MODEL}})["_id"]
    daemon = Daemon(openai_settings(sandbox, tmp_path))
    async with running(daemon):
        await wait_until(all_done(sandbox.state, 31))
    st = sandbox.state
    assert st.tasks[bad]["state"] == "failed"
    assert st.by_state() == {"succeeded": 30, "failed": 1}
    assert len(st.tasks[next(i for i in st.tasks if i != bad)]["result"]) == 1024
    assert route.call_count >= 3  # the whole batch, then halves down to the bad one


@respx.mock
async def test_daemon_parameter_400_is_one_clear_message_no_split_storm_no_task_failed(sandbox, tmp_path, captured_logs):
    """Regression (#11): `400 matryoshka_dim=1024 is not in a valid range` was taken for a bad
    input: 123 rejected requests for 64 tasks, every task failed."""
    passthrough_sandbox(sandbox)
    route = respx.post(f"{OPENAI}/v1/embeddings").mock(return_value=openai_error(400, "matryoshka_dim=1024 is not in a valid range"))
    sandbox.state.seed(64, model=MODEL)
    daemon = Daemon(openai_settings(sandbox, tmp_path))
    started = trio.current_time()
    async with running(daemon):
        await wait_until(lambda: released_or_failed(sandbox))
        reasons = daemon.not_ready_reasons()
        await trio.sleep(0.5)  # and no claiming while the backend is down
    # one request, then at most one probe per breaker wait (5 s, doubling) however slow the
    # machine ran this test; a split storm would be ~127
    assert route.call_count <= 2 + int((trio.current_time() - started) / 5.0)
    assert not failed(sandbox) and sandbox.state.by_state() == {"pending": 64}
    assert any("openai" in r and "EMBEDDING_DIMENSIONS" in r for r in reasons)
    unavailable = [e for e in captured_logs if e["event"] == "backend_unusable"]
    assert 1 <= len(unavailable) <= 2 and "matryoshka_dim=1024" in unavailable[0]["error"]


@respx.mock
async def test_daemon_server_ignoring_dimensions_fails_no_task(sandbox, tmp_path):
    """Regression (#11): 384-dim vectors for EMBEDDING_DIMENSIONS=1024 failed every task
    permanently ("expected 1024"); it is the backend's configuration problem."""
    passthrough_sandbox(sandbox)
    route = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=lambda r: openai_ok(r, dim=384, ignore_dimensions=True))
    sandbox.state.seed(20, model=MODEL)
    daemon = Daemon(openai_settings(sandbox, tmp_path))
    async with running(daemon):
        await wait_until(lambda: released_or_failed(sandbox))
        reasons = daemon.not_ready_reasons()
    assert not failed(sandbox) and sandbox.state.by_state() == {"pending": 20}
    assert route.call_count <= 2
    assert sum("EMBEDDING_DIMENSIONS=384" in r for r in reasons) == 1


@pytest.mark.parametrize(
    ("mode", "bad"),
    [
        ("ollama", httpx.Response(200, json={"model": "nomic-embed-text", "embeddings": None})),
        ("openai", httpx.Response(200, text="<html><body>maintenance</body></html>", headers={"content-type": "text/html"})),
        ("openai", httpx.Response(200, json={"object": "list", "model": MODEL})),
    ],
    ids=["ollama-embeddings-null", "openai-html-200", "openai-without-data"],
)
@respx.mock
async def test_daemon_survives_malformed_answers_and_the_tasks_succeed(sandbox, tmp_path, mode, bad):
    """Regression (#11): a malformed 200 crashed the daemon, its tasks stayed in_progress."""
    passthrough_sandbox(sandbox)
    calls = {"n": 0}

    def malformed_first(request):
        calls["n"] += 1
        if calls["n"] <= 2:
            return bad
        return ollama_embed_ok(request) if mode == "ollama" else openai_ok(request)

    if mode == "ollama":
        ollama_up(malformed_first)
        settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="ollama", OLLAMA_BASE_URL=OLLAMA, SUPPORTED_MODELS="nomic-embed-text",
                                 RETRY_MAX_DELAY_SECONDS="0.05")
        model = "nomic-embed-text"
    else:
        respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=malformed_first)
        settings = openai_settings(sandbox, tmp_path, RETRY_MAX_DELAY_SECONDS="0.05")
        model = MODEL
    sandbox.state.seed(8, model=model)
    async with running(Daemon(settings)):
        await wait_until(all_done(sandbox.state, 8))
    assert sandbox.state.by_state() == {"succeeded": 8} and calls["n"] >= 3


@respx.mock
async def test_daemon_busy_503_never_fails_a_task(sandbox, tmp_path):
    """Regression (#11): a 503 "busy" counted against the tasks and failed them."""
    passthrough_sandbox(sandbox)
    busy = {"on": True}

    def maybe_busy(request):
        if busy["on"]:
            return httpx.Response(503, json={"error": "server busy, please try again.  maximum pending requests exceeded"})
        return ollama_embed_ok(request)

    route = ollama_up(maybe_busy)
    sandbox.state.seed(6, model="nomic-embed-text")
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="ollama", OLLAMA_BASE_URL=OLLAMA, SUPPORTED_MODELS="nomic-embed-text",
                             OLLAMA_MAX_RETRIES="1", RETRY_MAX_DELAY_SECONDS="0.05", MAX_TASK_ATTEMPTS="1", CIRCUIT_BREAKER_THRESHOLD="50")
    async with running(Daemon(settings)):
        await wait_until(lambda: failed(sandbox) or (route.call_count >= 4 and sandbox.state.by_state().get("in_progress", 0) == 0))
        assert not failed(sandbox)
        busy["on"] = False
        await wait_until(all_done(sandbox.state, 6))
    assert sandbox.state.by_state() == {"succeeded": 6} and not failed(sandbox)


@respx.mock
async def test_daemon_honours_retry_after_without_tripping_the_breaker(sandbox, tmp_path):
    passthrough_sandbox(sandbox)
    calls = {"n": 0}

    def limited_first(request):
        calls["n"] += 1
        if calls["n"] <= 2:
            return openai_error(429, "Rate limit reached", code="rate_limit_exceeded", type_="requests", headers={"retry-after": "0.5"})
        return openai_ok(request)

    respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=limited_first)
    sandbox.state.seed(10)
    daemon = Daemon(openai_settings(sandbox, tmp_path, CIRCUIT_BREAKER_THRESHOLD="1"))
    t0 = trio.current_time()
    async with running(daemon):
        await wait_until(all_done(sandbox.state, 10))
        assert not daemon.pipeline.board.guards[next(iter(daemon.pipeline.board.guards))].is_open
    assert trio.current_time() - t0 >= 1.0  # waited 0.5 s twice
    assert sandbox.state.by_state() == {"succeeded": 10}


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        (429, {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}, "quota exhausted"),
        (401, {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}, "OPENAI_API_KEY"),
        (403, {"message": "Country, region, or territory not supported", "type": "request_forbidden", "code": None}, "openai backend circuit breaker open"),
    ],
)
@respx.mock
async def test_daemon_whole_backend_errors_release_claims_and_never_fail_tasks(sandbox, tmp_path, status, error, reason):
    passthrough_sandbox(sandbox)
    respx.post(f"{OPENAI}/v1/embeddings").mock(return_value=httpx.Response(status, json={"error": error}))
    sandbox.state.seed(10)
    daemon = Daemon(openai_settings(sandbox, tmp_path))
    async with running(daemon):
        await wait_until(lambda: any(p.state == "pending" for p in sandbox.state.patches))
        await wait_until(lambda: sandbox.state.by_state().get("in_progress", 0) == 0)
        assert any(reason in r for r in daemon.not_ready_reasons())
        quota = daemon.metrics.registry.get_sample_value("embedding_quota_exhausted", {"backend": "openai"})
        assert quota == (1 if status == 429 else 0)  # the series exists from the start (at 0)
        await trio.sleep(0.5)  # and no claiming while the backend is down
    assert sandbox.state.by_state() == {"pending": 10}  # never failed: the tasks wait for the backend


@respx.mock
async def test_daemon_ollama_mode_model_that_cannot_be_pulled_is_a_start_up_error(sandbox, tmp_path):
    passthrough_sandbox(sandbox)
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(200, json={"models": []}))
    respx.post(f"{OLLAMA}/api/pull").mock(return_value=httpx.Response(200, content=b'{"error":"pull model manifest: file does not exist"}\n'))
    respx.post(f"{OLLAMA}/api/embed").mock(return_value=httpx.Response(404, json={"error": 'model "nomic-embed-text" not found'}))
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="ollama", OLLAMA_BASE_URL=OLLAMA, SUPPORTED_MODELS="nomic-embed-text")
    daemon = Daemon(settings)
    with pytest.raises(StartupError, match="file does not exist"):
        await daemon.run()


@respx.mock
async def test_daemon_hybrid_routes_by_model_and_falls_back_only_when_asked(sandbox, tmp_path):
    passthrough_sandbox(sandbox)
    ollama = ollama_up()
    oai = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=openai_ok)
    local = sandbox.state.seed(5, model="nomic-embed-text")
    remote = sandbox.state.seed(5, model=MODEL, prefix="remote")
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="hybrid", OLLAMA_BASE_URL=OLLAMA, SUPPORTED_MODELS="nomic-embed-text",
                             OPENAI_API_KEY=KEY, OPENAI_BASE_URL=OPENAI)
    async with running(Daemon(settings)):
        await wait_until(all_done(sandbox.state, 10))
    st = sandbox.state
    assert all(len(st.tasks[i]["result"]) == 768 for i in local)
    assert all(len(st.tasks[i]["result"]) == 1024 for i in remote)
    assert ollama.called and oai.called
    sent_to_openai = [t for c in oai.calls for t in json.loads(c.request.content)["input"]]
    assert all(t.startswith("remote") for t in sent_to_openai)  # no silent cross-model fallback


@respx.mock
async def test_daemon_hybrid_unpullable_model_uses_the_fallback_only_when_configured(sandbox, tmp_path, captured_logs):
    passthrough_sandbox(sandbox)
    respx.get(f"{OLLAMA}/api/tags").mock(return_value=httpx.Response(200, json={"models": []}))
    respx.post(f"{OLLAMA}/api/pull").mock(return_value=httpx.Response(200, content=b'{"error":"pull model manifest: file does not exist"}\n'))
    respx.post(f"{OLLAMA}/api/embed").mock(return_value=httpx.Response(404, json={"error": 'model "nomic-embed-text" not found'}))
    oai = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=openai_ok)
    ids = sandbox.state.seed(6, model="nomic-embed-text")
    env = dict(PROCESSING_MODE="hybrid", OLLAMA_BASE_URL=OLLAMA, SUPPORTED_MODELS="nomic-embed-text",
               OPENAI_API_KEY="sk-test-0000000000000000", OPENAI_BASE_URL=OPENAI)
    # without FALLBACK_MODELS: the start goes on (hybrid) and the model's tasks stay pending
    # (CONTRACT §1: a model this deployment cannot serve is never a reason to fail a task),
    # the model named in /health
    daemon = Daemon(make_settings(sandbox, tmp_path / "a", **env))
    async with running(daemon):
        await wait_until(lambda: "nomic-embed-text" in daemon.health()["models_unservable"]
                         and sandbox.state.by_state() == {"pending": 6})
        assert "file does not exist" in daemon.health()["models_unservable"]["nomic-embed-text"]
    assert not oai.called and not [p for p in sandbox.state.patches if p.state == "failed"]
    # with it: the same tasks go to the named OpenAI model, logged and counted each time
    for i in ids:
        sandbox.state.tasks[i]["state"] = "pending"
        sandbox.state.pending[i] = None
    daemon = Daemon(make_settings(sandbox, tmp_path / "b", **env, FALLBACK_MODELS='{"nomic-embed-text": "text-embedding-3-small"}'))
    async with running(daemon):
        await wait_until(lambda: sandbox.state.by_state().get("succeeded", 0) == 6)
    assert all(json.loads(c.request.content)["model"] == MODEL for c in oai.calls)
    assert daemon.metrics.registry.get_sample_value("embedding_fallbacks_total", {"model": "nomic-embed-text", "fallback": MODEL}) == 6
    assert any(e["event"] == "model_fallback" for e in captured_logs)


async def test_daemon_hybrid_ollama_not_up_at_start_tasks_wait_then_succeed(sandbox, tmp_path, nursery):
    """Regression (#11): in hybrid, an Ollama not up within the start wait made its models
    unavailable for the life of the process, and every local-model task failed."""
    port = free_port()
    local = sandbox.state.seed(6, model="nomic-embed-text")
    settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="hybrid", OLLAMA_BASE_URL=f"http://127.0.0.1:{port}", SUPPORTED_MODELS="nomic-embed-text",
                             OPENAI_API_KEY=KEY, OPENAI_BASE_URL=OPENAI, OLLAMA_MODEL_DOWNLOAD_TIMEOUT="0.5",
                             OLLAMA_MAX_RETRIES="1", RETRY_MAX_DELAY_SECONDS="0.05", MAX_TASK_ATTEMPTS="1")
    daemon = Daemon(settings)
    stop = trio.Event()
    async with running(daemon):
        await wait_until(lambda: released_or_failed(sandbox))
        assert not failed(sandbox)
        assert any("ollama" in r and "unreachable" in r for r in daemon.not_ready_reasons())
        assert "unreachable" in daemon.health()["unavailable_models"]["ollama"]["nomic-embed-text"]
        await serve_fake_ollama(nursery, port, stop)
        await wait_until(all_done(sandbox.state, 6))
        assert "ollama" not in daemon.health()["unavailable_models"]
        assert not any("ollama" in r for r in daemon.not_ready_reasons())
    stop.set()
    assert sandbox.state.by_state() == {"succeeded": 6} and not failed(sandbox)
    assert all(len(sandbox.state.tasks[i]["result"]) == 768 for i in local)


@respx.mock
async def test_daemon_openai_rate_caps_and_over_long_inputs(sandbox, tmp_path):
    passthrough_sandbox(sandbox)
    route = respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=openai_ok)
    long_cjk = sandbox.state.create({"type": "text_embedding", "content": {"text": "語" * 9000, "model": MODEL}})["_id"]
    sandbox.state.seed(12, model=MODEL)  # the long one is oldest: in the first admitted group
    daemon = Daemon(openai_settings(sandbox, tmp_path, RATE_LIMIT_ENABLED="true", OPENAI_RATE_LIMIT_PER_MINUTE="6"))
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
    tid = sandbox.state.create({"type": "text_embedding", "content": {"text": "語" * 9000, "model": MODEL}})["_id"]
    async with running(Daemon(openai_settings(sandbox, tmp_path, OPENAI_TRUNCATE="true"))):
        await wait_until(all_done(sandbox.state, 1))
    assert sandbox.state.tasks[tid]["state"] == "succeeded"
    sent = json.loads(route.calls[0].request.content)["input"][0]
    assert 0 < len(sent) < 9000


@respx.mock
async def test_daemon_unreachable_backend_releases_and_never_fails_tasks(sandbox, tmp_path):
    passthrough_sandbox(sandbox)
    respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=httpx.ConnectError("connection refused"))
    sandbox.state.seed(8, model=MODEL)
    daemon = Daemon(openai_settings(sandbox, tmp_path, MAX_RETRIES="1", RETRY_MAX_DELAY_SECONDS="0.05", MAX_TASK_ATTEMPTS="1",
                                    CIRCUIT_BREAKER_THRESHOLD="50"))
    async with running(daemon):
        await wait_until(lambda: any(p.state == "pending" for p in sandbox.state.patches))
        await wait_until(lambda: sandbox.state.by_state().get("in_progress", 0) == 0)
        assert any("openai backend circuit breaker open" in r for r in daemon.not_ready_reasons())
    assert sandbox.state.by_state() == {"pending": 8}  # even with MAX_TASK_ATTEMPTS=1: never failed


async def test_mock_vectors_are_deterministic_unit_length_and_distinct():
    from processor.effects.backends.mock import MockBackend

    b = MockBackend(1024)
    one = (await b.embed("m", ["alpha", "beta", "alpha"])).vectors
    again = (await MockBackend(1024).embed("m", ["alpha"])).vectors
    other_model = (await b.embed("n", ["alpha"])).vectors
    assert one[0] == one[2] == again[0] and one[0] != one[1] and one[0] != other_model[0]
    assert all(len(v) == 1024 and abs(sum(x * x for x in v) - 1.0) < 1e-9 for v in one)
    assert len((await MockBackend(16).embed("m", ["x"])).vectors[0]) == 16


def test_classify_status_rows_not_covered_by_a_server_above():
    assert classify_status(413, "payload too large").fault is Fault.INPUT
    assert classify_status(405, "method not allowed") == classify_status(404, "404 page not found")
    assert classify_status(418, "teapot").fault is Fault.PARAMETER
    assert classify_status(529, "overloaded").fault is Fault.BUSY
    assert classify_status(500, 'model "x" not found').fault is Fault.MODEL_MISSING
