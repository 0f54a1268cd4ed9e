"""parse_entry never raises, and classifies every kind of entry as the contract says."""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from processor.pure.jsonstream import InvalidValue, unicode_problem
from processor.pure.tasks import (
    MAX_TEXT_CHARS,
    Backend,
    Rejected,
    RejectReason,
    Routing,
    Skipped,
    Task,
    is_object_id,
    parse_created_at,
    parse_entry,
)

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


surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=[])
any_text = st.text(st.characters(exclude_categories=[]) | surrogates, max_size=30)
near_ids = st.one_of(
    object_ids,
    object_ids.map(lambda i: i + "\n"),
    object_ids.map(lambda i: i + "\r\n"),
    object_ids.map(lambda i: "\n" + i),
    object_ids.map(str.upper),
    object_ids.map(lambda i: i[:23]),
    object_ids.map(lambda i: i + "0"),
    st.tuples(object_ids, st.integers(0, 23), surrogates | st.sampled_from(["\n", " ", "g", "\x00", "\u0660", "\uff10"])).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + 1 :]
    ),
    any_text,
    st.integers(),
    st.just(InvalidValue("text is not valid Unicode")),
)
texts = st.one_of(any_text, st.text(min_size=1, max_size=40), st.just(InvalidValue("text is not valid Unicode")), json_values)
contents = st.one_of(
    texts,
    st.fixed_dictionaries({"text": texts}, optional={"model": st.one_of(any_text, st.just("nomic-embed-text"), json_values)}),
)
HEX24 = re.compile(r"[0-9a-f]{24}")


@settings(max_examples=500)
@given(
    st.fixed_dictionaries(
        {"_id": near_ids, "type": st.one_of(st.just("text_embedding"), any_text, json_values)},
        optional={"content": contents, "createdAt": st.one_of(any_text, json_values, st.datetimes().map(lambda d: d.isoformat()))},
    ),
    st.sampled_from([OLLAMA, HYBRID, MOCK]),
)
def test_parse_is_total_and_accepts_only_exact_ids_and_valid_unicode(raw, routing):
    out = parse_entry(raw, routing)
    assert isinstance(out, (Task, Rejected, Skipped))
    if out.id is not None:
        # ids are exactly 24 lowercase hex, never with a newline, uppercase or other digits
        assert isinstance(out.id, str) and len(out.id) == 24 and HEX24.fullmatch(out.id) and out.id == raw["_id"]
    if isinstance(out, Task):
        assert unicode_problem(out.text) is None and unicode_problem(out.model) is None
        assert out.text.strip() and len(out.text) <= MAX_TEXT_CHARS
    if isinstance(out, Skipped):
        assert unicode_problem(out.type) is None and len(out.type) <= 64  # safe as a metric label
    if isinstance(out, Rejected):
        assert unicode_problem(out.detail) is None  # safe to log and to send as a reason


@given(any_text)
def test_a_text_that_is_not_valid_unicode_is_rejected_with_that_reason(text):
    oid = "a" * 24
    for content in (text, {"text": text, "model": "nomic-embed-text"}):
        out = parse_entry({"_id": oid, "type": "text_embedding", "content": content}, OLLAMA)
        if unicode_problem(text) is not None:
            assert isinstance(out, Rejected) and out.reason is RejectReason.INVALID_TEXT and out.id == oid
            assert "not valid Unicode" in out.detail


@given(st.one_of(near_ids, json_values))
def test_is_object_id_is_exact(value):
    assert is_object_id(value) == (isinstance(value, str) and len(value) == 24 and all(c in "0123456789abcdef" for c in value))


@given(st.one_of(any_text, json_values, st.datetimes().map(lambda d: d.isoformat()), st.datetimes().map(lambda d: d.isoformat() + "Z")))
def test_created_at_never_raises(value):
    out = parse_created_at(value)
    assert out is None or isinstance(out, float)
