"""The four triage kinds, computed against the chat and Wikidata fakes on loopback."""

from __future__ import annotations

import pytest
import trio
from prometheus_client import CollectorRegistry

from processor.config import load_settings
from processor.effects.asgi import serve_asgi
from processor.effects.chat.base import ChatError
from processor.effects.chat.metrics import chat_metrics
from processor.kinds import registry
from processor.kinds.base import Computed, Content, Defect, KindPorts, Work
from processor.kinds.triage import TriageKind
from processor.pure.faults import Fault
from processor.pure.tasks import Backend
from processor.pure.triage import TRIAGE_TYPES
from processor.sandbox.chain import refusal
from processor.sandbox.fake_chat import FakeChat, FakeChatState
from processor.sandbox.fake_wikidata import FakeWikidata, FakeWikidataState
from processor.wiring import build_chat_backends, build_wikidata

TEXT = "O senador João Silva disse que a vacina causa autismo, segundo Maria Oliveira."
CONTENT = {
    "identifying_data": {"text": TEXT, "model": "o3"},
    "defining_topics": {"text": TEXT, "model": "o3"},
    "defining_impact_area": {"text": TEXT, "model": "o3"},
    "defining_severity": {"text": TEXT, "model": "o3", "impactArea": {"name": "Saúde", "language": "pt", "wikidataId": None},
                          "topics": [{"name": "Vacinação", "language": "pt", "wikidataId": None}],
                          "personalities": [{"name": "João Silva", "wikidataId": "Q1"}]},
}


@pytest.fixture
async def fakes(nursery, tmp_path):
    chat, wiki = FakeChatState(), FakeWikidataState()
    stop = trio.Event()
    chat_url = await nursery.start(lambda task_status: serve_asgi(FakeChat(chat), "127.0.0.1", 0, shutdown=stop, task_status=task_status))
    wiki_url = await nursery.start(lambda task_status: serve_asgi(FakeWikidata(wiki), "127.0.0.1", 0, shutdown=stop, task_status=task_status))
    yield chat, wiki, chat_url, f"{wiki_url}/w/api.php"
    stop.set()


def settings_for(mode: str, fakes, tmp_path, **extra):
    _, _, chat_url, wiki_url = fakes
    env = {"API_BASE_URL": "http://api", "OAUTH2_TOKEN_URL": "http://api/t", "OAUTH2_CLIENT_ID": "c", "OAUTH2_CLIENT_SECRET": "s",
           "PROCESSING_MODE": mode, "OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": chat_url, "OLLAMA_BASE_URL": chat_url,
           "WIKIDATA_API_URL": wiki_url, "WIKIDATA_CONTACT": "ops@example.org", "STATE_DIR": str(tmp_path / "state"),
           "WIKIDATA_TIMEOUT_SECONDS": "2", **extra}
    return load_settings(env, dotenv_path=None)[0]


async def run(kind: TriageKind, settings, content, task_id="a" * 24):
    parsed = kind.parse(content)
    assert isinstance(parsed, Content), parsed
    backend, model = kind.route(parsed)
    registry_ = CollectorRegistry()
    ports = KindPorts(chat=build_chat_backends(settings, registry_), wikidata=build_wikidata(settings, chat_metrics(registry_)))
    work = Work(task_id, kind.type, parsed.text, model, backend, parsed.params,
                requested_model=parsed.model if parsed.model != model else None)
    try:
        (out,) = await kind.compute(ports, [work], timeout=10)
    finally:
        for chat in ports.chat.values():
            await chat.aclose()
        if ports.wikidata is not None:
            await ports.wikidata.aclose()
    return out, work, registry_


def kinds_for(settings) -> dict[str, TriageKind]:
    loaded = registry.load(settings, TRIAGE_TYPES)
    assert all(isinstance(k, TriageKind) for k in loaded.values())
    return loaded  # type: ignore[return-value]


@pytest.mark.parametrize("mode", ["mock", "openai", "ollama"])
@pytest.mark.parametrize("task_type", TRIAGE_TYPES)
async def test_each_type_computes_a_result_the_callback_accepts(fakes, tmp_path, mode, task_type):
    extra = {"MODEL_MAP": "o3=qwen3:4b"} if mode == "ollama" else {}
    settings = settings_for(mode, fakes, tmp_path, **extra)
    kind = kinds_for(settings)[task_type]
    out, work, _ = await run(kind, settings, CONTENT[task_type])
    assert isinstance(out, Computed), out
    assert refusal(task_type, out.result) is None
    assert out.meta["template"] == f"{task_type}/1" and out.meta["requested_model"] == "o3"
    assert work.backend is {"mock": Backend.MOCK, "openai": Backend.OPENAI, "ollama": Backend.OLLAMA}[mode]
    if mode == "ollama":
        assert work.model == "qwen3:4b"
    if task_type == "identifying_data" and mode != "mock":
        people = out.result["personalities"]
        assert people and all(p["wikidata"]["id"].startswith("Q") for p in people), people
    if task_type == "defining_topics":
        assert all(t["language"] == "pt" for t in out.result)


async def test_hybrid_routes_by_model_name(fakes, tmp_path):
    settings = settings_for("hybrid", fakes, tmp_path)
    kind = kinds_for(settings)["defining_severity"]
    assert kind.route(Content(TEXT, "o3")) == (Backend.OPENAI, "o3")
    assert kind.route(Content(TEXT, "gpt-4o-mini")) == (Backend.OPENAI, "gpt-4o-mini")
    assert kind.route(Content(TEXT, "qwen3:4b")) == (Backend.OLLAMA, "qwen3:4b")
    mapped = kinds_for(settings_for("hybrid", fakes, tmp_path, MODEL_MAP="o3=qwen3:4b"))["defining_severity"]
    assert mapped.route(Content(TEXT, "o3")) == (Backend.OLLAMA, "qwen3:4b")


@pytest.mark.parametrize("bad", ["invalid_json", "refusal", "cutoff", "out_of_enum", "wrong_type", "empty_list"])
@pytest.mark.parametrize("mode", ["openai", "ollama"])
async def test_every_bad_answer_is_asked_again_then_returned_as_bad_answer(fakes, tmp_path, bad, mode):
    chat, *_ = fakes
    settings = settings_for(mode, fakes, tmp_path, MODEL_MAP="o3=qwen3:4b" if mode == "ollama" else "", CHAT_BAD_ANSWER_RETRIES=2)
    kind = kinds_for(settings)["defining_topics"]
    chat.script = [bad]  # one bad answer: asked again at once
    out, _, registry_ = await run(kind, settings, CONTENT["defining_topics"])
    assert isinstance(out, Computed) and chat.answers == {bad: 1, "good": 1}
    chat.script = [bad] * 3  # 1 + CHAT_BAD_ANSWER_RETRIES bad answers: this task's BAD_ANSWER
    out, _, registry_ = await run(kind, settings, CONTENT["defining_topics"])
    assert isinstance(out, ChatError) and out.fault is Fault.BAD_ANSWER
    assert chat.answers == {bad: 4, "good": 1}
    assert sum(registry_.get_sample_value("chat_bad_answers_total", {"task_type": "defining_topics", "reason": r}) or 0
               for r in ("unusable", "invalid")) == 3


@pytest.mark.parametrize(("outcome", "fault"), [("503", Fault.BUSY), ("429", Fault.RATE_LIMITED), ("500", Fault.SERVER)])
async def test_call_faults_are_raised_as_classified(fakes, tmp_path, outcome, fault):
    chat, *_ = fakes
    chat.script = [outcome]
    settings = settings_for("openai", fakes, tmp_path)
    with pytest.raises(ChatError) as err:
        await run(kinds_for(settings)["defining_severity"], settings, CONTENT["defining_severity"])
    assert err.value.fault is fault


async def test_an_unservable_model_is_model_missing(fakes, tmp_path):
    chat, *_ = fakes
    chat.pullable = set()
    settings = settings_for("ollama", fakes, tmp_path)  # o3 is not an Ollama model, and no MODEL_MAP
    with pytest.raises(ChatError) as err:
        await run(kinds_for(settings)["identifying_data"], settings, CONTENT["identifying_data"])
    assert err.value.fault is Fault.MODEL_MISSING


@pytest.mark.parametrize("mode", ["down", "slow"])
async def test_wikidata_down_or_slow_sends_the_result_without_ids(fakes, tmp_path, mode):
    _, wiki, *_ = fakes
    wiki.mode, wiki.slow_seconds = mode, 30
    settings = settings_for("openai", fakes, tmp_path, WIKIDATA_TIMEOUT_SECONDS="0.5")
    out, _, registry_ = await run(kinds_for(settings)["identifying_data"], settings, CONTENT["identifying_data"])
    assert isinstance(out, Computed) and out.meta["wikidata"] == mode
    assert out.result["personalities"] and all("wikidata" not in p for p in out.result["personalities"])
    assert refusal("identifying_data", out.result) is None
    assert registry_.get_sample_value("wikidata_enrichment_degraded_total", {"reason": mode}) == 1


async def test_severity_needs_no_wikidata_and_area_gets_an_id(fakes, tmp_path):
    _, wiki, *_ = fakes
    settings = settings_for("openai", fakes, tmp_path)
    kinds = kinds_for(settings)
    out, *_ = await run(kinds["defining_severity"], settings, CONTENT["defining_severity"])
    assert isinstance(out, Computed) and out.meta["wikidata"] == "none"
    assert sum(wiki.requests.values()) == 0
    area, *_ = await run(kinds["defining_impact_area"], settings, CONTENT["defining_impact_area"])
    assert isinstance(area, Computed) and area.result["wikidataId"].startswith("Q")


@pytest.mark.parametrize("task_type", TRIAGE_TYPES)
async def test_defects(fakes, tmp_path, task_type):
    kind = kinds_for(settings_for("mock", fakes, tmp_path))[task_type]
    for content in ("a bare string", {"text": "x"}, {"model": "o3"}, None):
        out = kind.parse(content)
        assert isinstance(out, Defect) and out.detail


async def test_prompts_dir_and_language_reach_the_model(fakes, tmp_path):
    chat, *_ = fakes
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "defining_topics.txt").write_text("version: custom/3\n---system\nLang=$language_code\n---user\n$claim\n")
    settings = settings_for("openai", fakes, tmp_path, PROMPTS_DIR=str(tmp_path / "prompts"), OUTPUT_LANGUAGE="en")
    out, *_ = await run(kinds_for(settings)["defining_topics"], settings, CONTENT["defining_topics"])
    assert isinstance(out, Computed) and out.meta["template"] == "custom/3"
    assert chat.bodies[-1]["messages"][0]["content"] == "Lang=en"
    assert all(t["language"] == "en" for t in out.result)


async def test_check_tries_the_platform_model(fakes, tmp_path):
    chat, *_ = fakes
    settings = settings_for("ollama", fakes, tmp_path, MODEL_MAP="o3=qwen3:4b")
    kind = kinds_for(settings)["defining_severity"]
    ports = KindPorts(chat=build_chat_backends(settings, CollectorRegistry()))
    assert "qwen3:4b" in await kind.check(ports)
    chat.pulled, chat.pullable = set(), set()
    other = kinds_for(settings_for("ollama", fakes, tmp_path))["defining_severity"]
    with pytest.raises(ChatError):
        await other.check(KindPorts(chat=build_chat_backends(settings, CollectorRegistry())))
