"""Properties of the triage rules (processor.pure.triage, processor.pure.wikidata)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from processor.effects.chat.mock import mock_answer
from processor.pure import triage as t
from processor.pure import wikidata as wd
from processor.sandbox.chain import refusal

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
types = st.sampled_from(list(t.TriageType))
texts = st.text(min_size=1, max_size=300).filter(lambda s: s.strip())
names = st.text(min_size=0, max_size=40)


def claims(task_type: t.TriageType, text: str, options: list[str] | None = None) -> t.Claim:
    content: dict = {"text": text, "model": "o3"}
    if options is not None:
        content["options"] = options
    parsed = t.parse_content(task_type, content)
    assert isinstance(parsed, t.Claim), parsed
    return parsed


@given(types, json_values)
def test_parse_content_never_raises(task_type, content):
    out = t.parse_content(task_type, content)
    assert isinstance(out, t.Claim | t.Defect)
    if isinstance(content, str):
        assert isinstance(out, t.Defect)


@given(types, texts, json_values)
def test_validate_never_raises_and_anything_it_accepts_the_callback_accepts(task_type, text, answer):
    """Whatever JSON the model returns: either a BadAnswer, or a result the platform's
    callback (the sandbox's independent check of §6) accepts, with or without ids."""
    claim = claims(task_type, text)
    verdict = t.validate_answer(claim, json.dumps(answer))
    assert isinstance(verdict, t.Answer | t.BadAnswer)
    if isinstance(verdict, t.Answer):
        for ids in ({}, {n: t.Entity("Q42", n, "x") for n in t.lookups(verdict)[0]}):
            result = t.build_result(verdict, ids, language="pt")
            assert refusal(task_type.value, result) is None, result


@given(types, texts, st.text(max_size=200))
def test_validate_never_raises_on_any_text(task_type, text, raw):
    assert isinstance(t.validate_answer(claims(task_type, text), raw), t.Answer | t.BadAnswer)


@given(types, texts, st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=30).filter(t.clean_name), min_size=1, max_size=8)))
def test_mock_answers_always_validate(task_type, text, options):
    claim = claims(task_type, text, options)
    answer = mock_answer(t.answer_schema(claim), text)
    verdict = t.validate_answer(claim, json.dumps(answer))
    assert isinstance(verdict, t.Answer), verdict
    if task_type is t.TriageType.DEFINING_IMPACT_AREA:
        assert verdict.name in t.area_choices(claim)


@given(texts, st.lists(st.text(min_size=1, max_size=30).filter(t.clean_name), min_size=1, max_size=8), names)
def test_area_is_always_one_of_the_choices(text, options, name):
    claim = claims(t.TriageType.DEFINING_IMPACT_AREA, text, options)
    verdict = t.validate_answer(claim, json.dumps({"name": name, "description": ""}))
    if isinstance(verdict, t.Answer):
        assert verdict.name in claim.options


@given(texts, names)
def test_severity_is_always_one_of_ten(text, level):
    verdict = t.validate_answer(claims(t.TriageType.DEFINING_SEVERITY, text), json.dumps({"severity": level}))
    if isinstance(verdict, t.Answer):
        assert verdict.severity in t.SEVERITY_LEVELS
    else:
        assert level.strip().lower() not in t.SEVERITY_LEVELS


@given(st.sampled_from([t.TriageType.IDENTIFYING_DATA, t.TriageType.DEFINING_TOPICS]), texts, st.lists(names, max_size=20))
def test_names_are_deduplicated_by_slug_and_topics_never_empty(task_type, text, listed):
    key = "personalities" if task_type is t.TriageType.IDENTIFYING_DATA else "topics"
    verdict = t.validate_answer(claims(task_type, text), json.dumps({key: [{"name": n} for n in listed]}))
    if isinstance(verdict, t.Answer):
        slugs = [t.slug(n) for n in verdict.names]
        assert len(slugs) == len(set(slugs)) and all(slugs)
        if task_type is t.TriageType.DEFINING_TOPICS:
            assert verdict.names
    else:
        assert task_type is t.TriageType.DEFINING_TOPICS and not any(t.clean_name(n) for n in listed)


@given(st.lists(st.tuples(names, st.sampled_from(["Q1", "Q2", "Q3", None])), max_size=10))
def test_people_results_never_repeat_a_wikidata_id(pairs):
    verdict = t.Answer(t.TriageType.IDENTIFYING_DATA, names=t.dedupe(n for n, _ in pairs if t.clean_name(n)))
    ids = {n: (t.Entity(q) if q else None) for n, q in pairs}
    people = t.build_result(verdict, ids, language="pt")["personalities"]
    found = [p["wikidata"]["id"] for p in people if "wikidata" in p]
    assert len(found) == len(set(found))


@given(st.text(max_size=300))
def test_fenced_text_has_exactly_one_closing_delimiter(text):
    fenced = t.fence(text, t.CLAIM_OPEN, t.CLAIM_CLOSE)
    assert fenced.lower().count(t.CLAIM_CLOSE) == 1 and fenced.endswith(t.CLAIM_CLOSE)
    assert fenced.lower().count(t.CLAIM_OPEN) == 1 and fenced.startswith(t.CLAIM_OPEN)


@given(st.text(max_size=60))
def test_slug_is_idempotent_and_plain(name):
    s = t.slug(name)
    assert t.slug(s) == s
    assert all(c.isascii() and (c.isalnum() or c == "-") for c in s)


@given(json_values)
def test_wikidata_readers_raise_only_unreadable(body):
    for read in (wd.parse_search, lambda b: wd.parse_entities(b, "pt")):
        try:
            read(body)
        except wd.Unreadable:
            pass


@given(st.lists(st.sampled_from([f"Q{i}" for i in range(1, 200)]), max_size=300), st.integers(1, 60))
def test_chunks_cover_every_id_once_within_the_limit(ids, size):
    parts = wd.chunks(ids, size)
    flat = [i for p in parts for i in p]
    assert flat == list(dict.fromkeys(ids))
    assert all(0 < len(p) <= size for p in parts)


@settings(max_examples=50)
@given(st.lists(st.tuples(st.sampled_from(["Q1", "Q2", "Q3", "Q4"]), st.booleans()), max_size=6))
def test_best_human_is_the_first_human_candidate(cands):
    candidates = [t.Entity(q) for q, _ in cands]
    facts = {q: wd.Facts(q, human) for q, human in reversed(cands)}
    best = wd.best_match(candidates, facts)
    humans = [c.id for c in candidates if facts[c.id].human]
    assert (best.id if best else None) == (humans[0] if humans else None)
