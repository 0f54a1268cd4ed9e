"""What each kind reserves for a token or spend budget (`demand`), and the usage it reports
for the settlement (`Computed.meta["usage"]`): embeddings from the backend's count, chat
from every answer asked for, a chat task asked again only after one more reservation."""

from __future__ import annotations

import orjson
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from processor.effects.asgi import serve_asgi
from processor.effects.backends.mock import MockBackend
from processor.effects.chat.base import ChatError
from processor.kinds.base import Computed, Content, KindPorts, Usage, Work
from processor.kinds.embedding import EmbeddingKind
from processor.pure import budget
from processor.pure.faults import Fault
from processor.pure.tasks import Backend
from processor.sandbox.fake_chat import FakeChat, FakeChatState
from processor.wiring import build_chat_backends
from tests.test_triage_kinds import CONTENT, kinds_for, settings_for


@pytest.fixture
async def fakes(nursery):
    chat = FakeChatState()
    stop = trio.Event()
    url = await nursery.start(lambda task_status: serve_asgi(FakeChat(chat), "127.0.0.1", 0, shutdown=stop, task_status=task_status))
    yield chat, None, url, "http://127.0.0.1:9/w/api.php"
    stop.set()


@given(st.lists(st.text(), max_size=5), st.integers(0, 100_000))
def test_a_chat_bound_covers_every_byte_sent_and_the_answer_budget(texts, max_tokens):
    tin, tout = budget.chat_bound(texts, max_tokens)
    assert tin == sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) + budget.CHAT_FRAMING
    assert tout == (max_tokens or budget.UNBOUNDED_ANSWER)


async def test_an_embedding_reserves_its_bytes_and_reports_the_calls_tokens():
    kind = EmbeddingKind()
    works = [Work(f"{i:024x}", "text_embedding", "ação " * 10, "text-embedding-3-small", Backend.MOCK) for i in range(2)]
    d = kind.demand(works[0])
    assert (d.tokens_in, d.tokens_out, d.model) == (len(("ação " * 10).encode()), 0, "text-embedding-3-small")
    local = Work("a" * 24, "text_embedding", "x", "nomic-embed-text", Backend.OLLAMA)
    assert kind.demand(local).model is None  # a local backend costs nothing
    out = await kind.compute(KindPorts(embedding={Backend.MOCK: MockBackend(8)}), works)
    assert all(isinstance(a, Computed) for a in out)
    assert {a.meta["usage"] for a in out if isinstance(a, Computed)} == {Usage(2 * (len(("ação " * 10).encode()) // 3 + 1))}


class Port:
    def __init__(self, room: int) -> None:
        self.room = room
        self.asked = 0

    async def again(self, work: Work) -> bool:
        self.asked += 1
        if self.room <= 0:
            return False
        self.room -= 1
        return True


async def _run(kind, settings, port):
    parsed = kind.parse(CONTENT[kind.type])
    assert isinstance(parsed, Content)
    backend, model = kind.route(parsed)
    ports = KindPorts(chat=build_chat_backends(settings, CollectorRegistry()), budget=port)
    work = Work("b" * 24, kind.type, parsed.text, model, backend, parsed.params)
    try:
        (out,) = await kind.compute(ports, [work], timeout=10)
    finally:
        for chat in ports.chat.values():
            await chat.aclose()
    return out, work


async def test_a_chat_task_reserves_its_prompt_schema_and_answer_budget(fakes, tmp_path):
    settings = settings_for("openai", fakes, tmp_path, CHAT_MAX_TOKENS=500, WIKIDATA_ENABLED="false")
    kind = kinds_for(settings)["defining_topics"]
    parsed = kind.parse(CONTENT["defining_topics"])
    assert isinstance(parsed, Content)
    work = Work("c" * 24, kind.type, parsed.text, "o3", Backend.OPENAI, parsed.params)
    _, request = kind.request(work)
    d = kind.demand(work)
    sent = len(request.system.encode()) + len(request.user.encode()) + len(orjson.dumps(request.schema))
    assert (d.tokens_in, d.tokens_out, d.model) == (sent + budget.CHAT_FRAMING, 500, "o3")


async def test_a_bad_answer_is_asked_again_only_with_one_more_reservation(fakes, tmp_path):
    chat, *_ = fakes
    settings = settings_for("openai", fakes, tmp_path, CHAT_BAD_ANSWER_RETRIES=2, WIKIDATA_ENABLED="false")
    kind = kinds_for(settings)["defining_topics"]
    chat.script = ["out_of_enum", "good"]
    port = Port(room=1)
    out, _ = await _run(kind, settings, port)
    assert isinstance(out, Computed) and port.asked == 1 and chat.answers == {"out_of_enum": 1, "good": 1}
    usage = out.meta["usage"]
    assert usage.tokens_in > 0 and usage.tokens_out > 0  # both answers' tokens, summed
    assert usage.tokens_in == 2 * out.meta["prompt_tokens"]
    chat.script = ["out_of_enum", "good"]
    out, _ = await _run(kind, settings, Port(room=0))  # no room for a second call: handed back
    assert isinstance(out, ChatError) and out.fault is Fault.BAD_ANSWER
    assert chat.answers == {"out_of_enum": 2, "good": 1}


async def test_a_refused_answer_leaves_the_usage_unknown(fakes, tmp_path):
    chat, *_ = fakes
    settings = settings_for("openai", fakes, tmp_path, CHAT_BAD_ANSWER_RETRIES=1, WIKIDATA_ENABLED="false")
    kind = kinds_for(settings)["defining_topics"]
    chat.script = ["refusal", "good"]
    out, _ = await _run(kind, settings, Port(room=5))
    assert isinstance(out, Computed) and "usage" not in out.meta  # the reservations stay spent
