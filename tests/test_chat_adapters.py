"""The chat adapters against the local fakes (real HTTP on loopback) and, for the error
table, against respx answers."""

from __future__ import annotations

import json

import httpx
import orjson
import pytest
import respx
import trio
from prometheus_client import CollectorRegistry

from processor.effects.asgi import serve_asgi
from processor.effects.chat.base import ChatError, ChatRequest
from processor.effects.chat.metrics import chat_metrics
from processor.effects.chat.mock import MockChat
from processor.effects.chat.ollama import OllamaChat
from processor.effects.chat.openai import OpenAIChat
from processor.effects.prompts import load_templates
from processor.pure import triage as t
from processor.pure.faults import Fault
from processor.sandbox.fake_chat import FakeChat, FakeChatState

TEXT = "O senador João Silva disse que a vacina causa autismo em Recife."


@pytest.fixture
async def fake(nursery):
    state = FakeChatState()
    stop = trio.Event()
    url = await nursery.start(lambda task_status: serve_asgi(FakeChat(state), "127.0.0.1", 0, shutdown=stop, task_status=task_status))
    yield state, url
    stop.set()


def request(task_type: t.TriageType, model: str = "o3", **extra) -> tuple[t.Claim, ChatRequest]:
    claim = t.parse_content(task_type, {"text": TEXT, "model": model, **extra})
    assert isinstance(claim, t.Claim)
    system, user = t.render(load_templates()[task_type], claim, language="pt")
    return claim, ChatRequest(model, system, user, t.answer_schema(claim), t.schema_name(task_type), task_type.value)


def value(registry, name, **labels):
    return registry.get_sample_value(name, labels) or 0.0


def openai_chat(url: str, registry=None, **kw) -> OpenAIChat:
    return OpenAIChat(api_key="sk-test-secret", base_url=url, timeout=5, max_tokens=kw.pop("max_tokens", 1000),
                      metrics=chat_metrics(registry or CollectorRegistry()), **kw)


def ollama_chat(url: str, registry=None, **kw) -> OllamaChat:
    return OllamaChat(base_url=url, timeout=5, download_timeout=5, keep_alive="5m", num_ctx=4096, max_tokens=1000,
                      metrics=chat_metrics(registry or CollectorRegistry()), **kw)


@pytest.mark.parametrize("model", ["o3", "gpt-5-mini", "gpt-4o-mini"])
@pytest.mark.parametrize("task_type", list(t.TriageType))
async def test_openai_answers_validate_for_every_type_and_model_family(fake, model, task_type):
    state, url = fake
    registry = CollectorRegistry()
    chat = openai_chat(url, registry)
    claim, req = request(task_type, model)
    answer = await chat.complete(req)
    await chat.aclose()
    assert isinstance(t.validate_answer(claim, answer.content_json), t.Answer)
    sent = state.bodies[-1]
    reasoning = t.is_reasoning_model(model)
    assert ("temperature" in sent) is not reasoning
    assert ("max_completion_tokens" in sent) is reasoning and ("max_tokens" in sent) is not reasoning
    assert sent["response_format"]["json_schema"]["strict"] is True
    assert answer.prompt_tokens > 0 and answer.completion_tokens == 20
    labels = {"backend": "openai", "model": model, "task_type": task_type.value}
    assert value(registry, "chat_tokens_used_total", **labels, kind="completion") == 20
    assert value(registry, "chat_requests_total", **labels, outcome="success") == 1


@pytest.mark.parametrize("kind", ["invalid_json", "refusal", "cutoff"])
@pytest.mark.parametrize("backend", ["openai", "ollama"])
async def test_unusable_answers_are_bad_answer(fake, kind, backend):
    state, url = fake
    state.script = [kind]
    chat = openai_chat(url) if backend == "openai" else ollama_chat(url)
    _, req = request(t.TriageType.DEFINING_SEVERITY, "o3" if backend == "openai" else "qwen3:4b")
    with pytest.raises(ChatError) as err:
        await chat.complete(req)
    await chat.aclose()
    assert err.value.fault is Fault.BAD_ANSWER


@pytest.mark.parametrize("kind", ["out_of_enum", "wrong_type", "empty_list"])
async def test_schema_violations_parse_but_fail_validation(fake, kind):
    state, url = fake
    state.script = [kind]
    chat = openai_chat(url)
    claim, req = request(t.TriageType.DEFINING_TOPICS if kind == "empty_list" else t.TriageType.DEFINING_IMPACT_AREA)
    answer = await chat.complete(req)
    await chat.aclose()
    assert isinstance(t.validate_answer(claim, answer.content_json), t.BadAnswer)


async def test_openai_learns_a_parameter_the_model_refuses():
    """A model the family rules get wrong: the 400 names the parameter (PARAMETER), and the
    next request leaves it out."""
    calls = []

    def answer(req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content)
        calls.append(body)
        if "temperature" in body:
            return httpx.Response(400, json={"error": {"message": "Unsupported value: 'temperature'", "param": "temperature",
                                                       "code": "unsupported_value"}})
        return httpx.Response(200, json={"choices": [{"message": {"content": '{"severity": "low_1"}'}, "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 5, "completion_tokens": 3}, "model": "gpt-9"})

    with respx.mock(assert_all_called=False) as mock:
        mock.post("https://api.openai.com/v1/chat/completions").mock(side_effect=answer)
        chat = openai_chat(None)
        _, req = request(t.TriageType.DEFINING_SEVERITY, "gpt-9")
        with pytest.raises(ChatError) as err:
            await chat.complete(req)
        assert err.value.fault is Fault.PARAMETER and err.value.param == "temperature"
        ok = await chat.complete(req)
        await chat.aclose()
    assert "temperature" not in calls[-1] and ok.content_json == '{"severity": "low_1"}'


def _err(status, code=None, param=None, headers=None):
    return httpx.Response(status, json={"error": {"message": "m", "type": "t", "code": code, "param": param}}, headers=headers or {})


@pytest.mark.parametrize(
    ("response", "fault", "retry_after"),
    [
        (_err(401, "invalid_api_key"), Fault.AUTH, None),
        (_err(403), Fault.AUTH, None),
        (_err(429, "insufficient_quota"), Fault.QUOTA, None),
        (_err(429, "rate_limit_exceeded", headers={"retry-after": "0.01"}), Fault.RATE_LIMITED, 0.01),
        (_err(404, "model_not_found"), Fault.MODEL_MISSING, None),
        (_err(408), Fault.TIMEOUT, None),
        (_err(500), Fault.SERVER, None),
        (_err(503), Fault.BUSY, None),
        (_err(400, "unsupported_parameter", "max_tokens"), Fault.PARAMETER, None),
        (_err(400, "context_length_exceeded"), Fault.INPUT, None),
        (httpx.Response(200, content=b"<html>"), Fault.MALFORMED, None),
        (httpx.Response(200, json={"choices": []}), Fault.MALFORMED, None),
        (httpx.Response(200, json={"choices": [{"message": {"content": None, "refusal": "no"}, "finish_reason": "stop"}]}),
         Fault.BAD_ANSWER, None),
        (httpx.Response(200, json={"choices": [{"message": {"content": '{"a":'}, "finish_reason": "length"}]}), Fault.BAD_ANSWER, None),
        (httpx.Response(200, json={"choices": [{"message": {"content": "[1]"}, "finish_reason": "stop"}]}), Fault.BAD_ANSWER, None),
        (httpx.ConnectError("refused"), Fault.UNREACHABLE, None),
        (httpx.ReadTimeout("slow"), Fault.TIMEOUT, None),
    ],
)
async def test_openai_error_table(response, fault, retry_after):
    with respx.mock() as mock:
        route = mock.post("https://api.openai.com/v1/chat/completions")
        if isinstance(response, Exception):
            route.mock(side_effect=response)
        else:
            route.mock(return_value=response)
        chat = openai_chat(None)
        with pytest.raises(ChatError) as err:
            await chat.complete(request(t.TriageType.DEFINING_SEVERITY)[1])
        await chat.aclose()
    assert err.value.fault is fault
    assert err.value.retry_after == retry_after
    assert "sk-test-secret" not in str(err.value)


async def test_ollama_pulls_a_chat_model_on_first_use(fake):
    state, url = fake
    state.pulled = set()
    registry = CollectorRegistry()
    chat = ollama_chat(url, registry)
    claim, req = request(t.TriageType.DEFINING_TOPICS, "llama3.2:1b")
    answer = await chat.complete(req)
    again = await chat.complete(req)
    await chat.aclose()
    assert isinstance(t.validate_answer(claim, answer.content_json), t.Answer) and again.content_json == answer.content_json
    assert "llama3.2:1b" in state.pulled and state.requests["/api/pull"] == 1 and state.requests["/api/show"] == 2
    sent = state.bodies[-1]
    assert sent["stream"] is False and sent["format"] == req.schema and sent["options"]["temperature"] == 0
    assert sent["keep_alive"] == "5m"
    assert value(registry, "chat_tokens_used_total", backend="ollama", model="llama3.2:1b", task_type="defining_topics", kind="prompt") == 200


@pytest.mark.parametrize("case", ["not_pullable", "embedding_only"])
async def test_ollama_model_that_cannot_chat_is_model_missing(fake, case):
    state, url = fake
    if case == "not_pullable":
        state.pulled, state.pullable, model = set(), set(), "no-such-model"
    else:
        state.pulled, model = {"nomic-embed-text"}, "nomic-embed-text"
    chat = ollama_chat(url)
    for _ in range(2):  # remembered: the second call does not pull again
        with pytest.raises(ChatError) as err:
            await chat.complete(request(t.TriageType.DEFINING_SEVERITY, model)[1])
        assert err.value.fault is Fault.MODEL_MISSING
    assert model in chat.unavailable
    await chat.aclose()
    assert state.requests["/api/pull"] == (1 if case == "not_pullable" else 0)
    assert state.requests["/api/chat"] == 0


@pytest.mark.parametrize(("outcome", "fault"), [("503", Fault.BUSY), ("500", Fault.SERVER), ("429", Fault.RATE_LIMITED)])
async def test_ollama_server_errors(fake, outcome, fault):
    state, url = fake
    state.script = [outcome]
    chat = ollama_chat(url)
    with pytest.raises(ChatError) as err:
        await chat.complete(request(t.TriageType.DEFINING_SEVERITY, "qwen3:4b")[1])
    await chat.aclose()
    assert err.value.fault is fault


async def test_unreachable_ollama_is_unreachable_not_model_missing():
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    chat = ollama_chat(f"http://127.0.0.1:{port}")
    with pytest.raises(ChatError) as err:
        await chat.complete(request(t.TriageType.DEFINING_SEVERITY, "qwen3:4b")[1])
    await chat.aclose()
    assert err.value.fault is Fault.UNREACHABLE and not chat.unavailable


@pytest.mark.parametrize("task_type", list(t.TriageType))
async def test_mock_is_deterministic_and_valid(task_type):
    chat = MockChat(metrics=chat_metrics(CollectorRegistry()))
    claim, req = request(task_type)
    a, b = await chat.complete(req), await chat.complete(req)
    assert a == b and isinstance(t.validate_answer(claim, a.content_json), t.Answer)
    other = request(task_type)[1]
    other = ChatRequest(other.model, other.system, other.user.replace("Recife", "Manaus"), other.schema, other.schema_name, other.task_type)
    if task_type is t.TriageType.DEFINING_TOPICS:
        assert orjson.loads((await chat.complete(other)).content_json) != orjson.loads(a.content_json)


def test_chat_model_labels_are_bounded() -> None:
    """A task chooses its model name: the metric's label values must stay bounded."""
    from prometheus_client import CollectorRegistry

    from processor.effects.chat.metrics import MODEL_LABELS_MAX, ChatMetrics

    r = CollectorRegistry()
    m = ChatMetrics(r)
    for i in range(MODEL_LABELS_MAX + 500):
        m.requests.labels("openai", f"model-{i}" + "x" * 300, "defining_topics", "success").inc()
    models = {s.labels["model"] for fam in r.collect() if fam.name == "chat_requests" for s in fam.samples}
    assert len(models) == MODEL_LABELS_MAX + 1 and "other" in models
    assert max(len(x) for x in models) <= 100
