"""parse_entry never raises, and classifies every kind of entry as the contract says."""

from hypothesis import given
from hypothesis import strategies as st

from processor.pure.tasks import MAX_TEXT_CHARS, Backend, Rejected, RejectReason, Routing, Skipped, Task, parse_entry

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
object_ids = st.text(alphabet="0123456789abcdef", min_size=24, max_size=24)
OLLAMA = Routing(default_model="nomic-embed-text", local_models=frozenset({"nomic-embed-text"}))
HYBRID = Routing(default_model="nomic-embed-text", local_models=frozenset({"nomic-embed-text"}), remote=True)
MOCK = Routing(default_model="m", mock=True)


@given(json_values)
def test_parse_never_raises_on_any_json(raw):
    for routing in (OLLAMA, HYBRID, MOCK):
        assert isinstance(parse_entry(raw, routing), (Task, Rejected, Skipped))


@given(st.dictionaries(st.sampled_from(["_id", "type", "content", "state", "createdAt", "__v", "x"]), json_values))
def test_parse_never_raises_on_task_shaped_dicts(raw):
    out = parse_entry(raw, HYBRID)
    if isinstance(out, Task):
        assert 1 <= len(out.text) <= MAX_TEXT_CHARS and out.text.strip()
        assert isinstance(raw.get("_id"), str)


@given(object_ids, st.text(min_size=1, max_size=200).filter(str.strip), st.text(max_size=20))
def test_valid_task_keeps_id_text_and_model(oid, text, extra):
    raw = {"_id": oid, "type": "text_embedding", "content": {"text": text, "model": "nomic-embed-text"}, "__v": 0, "future": extra}
    out = parse_entry(raw, OLLAMA)
    assert out == Task(oid, text, "nomic-embed-text", Backend.OLLAMA, None)


@given(object_ids, st.text(min_size=1, max_size=50).filter(str.strip))
def test_bare_string_content_gets_the_default_model(oid, text):
    out = parse_entry({"_id": oid, "type": "text_embedding", "content": text}, OLLAMA)
    assert isinstance(out, Task) and out.model == "nomic-embed-text"


@given(object_ids, st.text(min_size=1, max_size=20).filter(lambda s: s != "text_embedding"))
def test_unknown_type_is_skipped_not_rejected(oid, kind):
    assert parse_entry({"_id": oid, "type": kind, "content": "x"}, HYBRID) == Skipped(oid, kind[:64])


def test_each_malformed_kind_has_its_reason():
    oid = "a" * 24
    cases = {
        RejectReason.MISSING_ID: {"type": "text_embedding", "content": "x"},
        RejectReason.INVALID_ID: {"_id": "nope", "type": "text_embedding", "content": "x"},
        RejectReason.MISSING_CONTENT: {"_id": oid, "type": "text_embedding", "content": None},
        RejectReason.INVALID_CONTENT: {"_id": oid, "type": "text_embedding", "content": 42},
        RejectReason.EMPTY_TEXT: {"_id": oid, "type": "text_embedding", "content": {"text": "  ", "model": "nomic-embed-text"}},
        RejectReason.TEXT_TOO_LONG: {"_id": oid, "type": "text_embedding", "content": "x" * (MAX_TEXT_CHARS + 1)},
        RejectReason.UNSUPPORTED_MODEL: {"_id": oid, "type": "text_embedding", "content": {"text": "hi", "model": "gpt-x"}},
        RejectReason.INVALID_MODEL: {"_id": oid, "type": "text_embedding", "content": {"text": "hi", "model": ""}},
        RejectReason.NOT_AN_OBJECT: [1, 2],
    }
    for reason, raw in cases.items():
        out = parse_entry(raw, OLLAMA)
        assert isinstance(out, Rejected) and out.reason is reason, (reason, out)
        assert out.detail


def test_routing_per_mode():
    assert HYBRID.backend_for("nomic-embed-text") is Backend.OLLAMA
    assert HYBRID.backend_for("nomic-embed-text:latest") is Backend.OLLAMA
    assert HYBRID.backend_for("text-embedding-3-small") is Backend.OPENAI
    assert OLLAMA.backend_for("text-embedding-3-small") is None
    assert Routing(default_model="x", remote=True).backend_for("anything") is Backend.OPENAI
    assert MOCK.backend_for("anything") is Backend.MOCK
