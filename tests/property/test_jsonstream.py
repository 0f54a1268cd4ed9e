"""The pending-list reader: each element decoded on its own, a bad value confined to its
element, a body that is not a complete array always `MalformedBody`, nothing else raised."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.pure.jsonstream import MAX_DEPTH, ArraySplitter, InvalidValue, MalformedBody, decode_element, unicode_problem

surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=[])
any_char = st.characters(exclude_categories=[]) | surrogates
# values a real peer can write: integers of any size (JavaScript, Python), floats, strings
# with lone surrogates, nesting
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 5, max_value=2**70)
    | st.integers(min_value=-(2**70), max_value=-(2**63) + 5)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(any_char, max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=24,
)


def expected(v: Any) -> Any:
    """What the reader gives for `v`: invalid strings marked, integers beyond 64 bits as floats."""
    if isinstance(v, str):
        return "<invalid>" if unicode_problem(v) else v
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return v if -(2**63) <= v <= 2**64 - 1 else float(v)
    if isinstance(v, list):
        return [expected(x) for x in v]
    if isinstance(v, dict):
        return {k: expected(x) for k, x in v.items()}
    return v


def normal(v: Any) -> Any:
    if isinstance(v, InvalidValue):
        return "<invalid>"
    if isinstance(v, list):
        return [normal(x) for x in v]
    if isinstance(v, dict):
        return {k: normal(x) for k, x in v.items()}
    return v


def read(body: bytes, cuts: list[int]) -> tuple[list[Any], MalformedBody | None]:
    sp = ArraySplitter()
    out: list[Any] = []
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    try:
        for a, b in zip(points, points[1:], strict=False):
            for e in sp.feed(body[a:b]):
                value = decode_element(e)
                orjson.dumps(value, default=str)  # whatever comes out can be logged and fingerprinted
                out.append(value)
        sp.close()
    except MalformedBody as exc:
        return out, exc
    return out, None


@settings(max_examples=300)
@given(st.lists(json_values, max_size=8), st.lists(st.integers(min_value=0), max_size=12), st.booleans())
def test_every_element_is_read_whatever_the_chunking(values, cuts, pretty):
    body = json.dumps(values, indent=1 if pretty else None).encode()
    out, err = read(body, cuts)
    assert err is None
    assert [normal(x) for x in out] == [expected(v) for v in values]


@given(st.lists(json_values, min_size=1, max_size=6), st.integers(min_value=0), st.data())
def test_a_bad_element_spoils_only_itself(values, where, data):
    """Raw bytes that no decoder accepts, in one element: the others are all read."""
    bad = data.draw(st.sampled_from([b"tru", b'{"a" 1}', b'"caf\xe9"', b"1e999", b"[" * 3000 + b"]" * 3000, b'"\\ud800"', b"-",
                                     b"[" * 300 + b"]" * 300, b'{"_id": "x", "d": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}",
                                     b'{"d": ' + b"[" * 200 + b'"\\udc00"' + b"]" * 200 + b"}"]))
    parts = [json.dumps(v).encode() for v in values]
    i = where % (len(parts) + 1)
    parts.insert(i, bad)
    out, err = read(b"[" + b", ".join(parts) + b"]", data.draw(st.lists(st.integers(min_value=0), max_size=8)))
    assert err is None and len(out) == len(values) + 1
    others = out[:i] + out[i + 1 :]
    assert [normal(x) for x in others] == [expected(v) for v in values]
    spoilt = out[i]
    if bad == b"1e999":
        assert spoilt == math.inf  # read as a number, as JavaScript would; never a crash
    else:
        assert isinstance(spoilt, InvalidValue)


@given(json_values.filter(lambda v: not isinstance(v, list)), st.lists(st.integers(min_value=0), max_size=4))
def test_a_body_that_is_not_an_array_is_malformed(value, cuts):
    out, err = read(json.dumps(value).encode(), cuts)
    assert isinstance(err, MalformedBody) and out == []


@given(st.lists(json_values, min_size=1, max_size=6), st.integers(min_value=1), st.lists(st.integers(min_value=0), max_size=6))
def test_a_cut_off_body_is_malformed_and_what_came_before_is_intact(values, cut, cuts):
    body = json.dumps(values).encode()
    prefix = body[: cut % len(body)]
    out, err = read(prefix, cuts)
    assert isinstance(err, MalformedBody)
    full = [normal(x) for x in read(body, [])[0]]
    got = [normal(x) for x in out]
    # every element handed out before the cut is a whole element of the full body, except
    # possibly the last scalar one, which the cut may have shortened (`[1, 23` of `[1, 234]`)
    assert got[: max(0, len(got) - 1)] == full[: max(0, len(got) - 1)]


@settings(max_examples=300)
@given(st.binary(max_size=200), st.lists(st.integers(min_value=0), max_size=6))
def test_any_bytes_give_elements_or_malformed_never_another_error(body, cuts):
    read(b"[" + body, cuts)  # raises nothing but MalformedBody (caught in `read`)
    read(body, cuts)


def test_an_oversized_element_is_skipped_not_kept():
    sp = ArraySplitter(max_element_bytes=1000)
    got: list[Any] = []
    got += sp.feed(b'[{"_id": "a", "text": "')
    for _ in range(100):
        got += sp.feed(b"x" * 500)
        assert len(sp._buf) < 2000  # memory stays bounded while it is read past
    got += sp.feed(b'"}, {"b": 2}]')
    sp.close()
    assert isinstance(got[0], InvalidValue) and "larger than" in got[0].what
    assert decode_element(got[1]) == {"b": 2}
