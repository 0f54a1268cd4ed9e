"""Hypothesis strategies for hostile worlds: pending entries (as the raw bytes another
program may write), token answers, faults at every step, backend answers.

An entry is drawn as a recipe (`EntrySpec`) and turned into bytes by `World`-side code, so
that shrunk examples read as plain data."""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import strategies as st

from processor.sandbox.app import Fault, PendingShape, TokenAnswer
from processor.sandbox.fake_backends import Answer
from processor.sandbox.harness import LOCAL_MODEL, World, json_raw

SAFE_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
)
JSON = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
ISO = st.sampled_from(["2025-09-03T18:22:31.120Z", "2025-09-03T18:22:31Z", "not a date", "2025-13-45T99:99:99Z"])

DEFECTS: dict[str, tuple[Any, tuple[str, ...]]] = {
    # kind: (content, words the failure reason must name one of)
    "null_content": (None, ("content",)),
    "number_content": (42, ("content",)),
    "list_content": (["a", "b"], ("content",)),
    "text_not_a_string": ({"text": 12.5, "model": LOCAL_MODEL}, ("text", "content")),
    "empty_text": ({"text": "", "model": LOCAL_MODEL}, ("empty", "text")),
    "blank_text": ({"text": "   \n\t", "model": LOCAL_MODEL}, ("empty", "text", "blank")),
    "too_long": ({"text": "x" * 10_001, "model": LOCAL_MODEL}, ("long", "10000", "10,000", "characters", "limit")),
    "model_not_a_string": ({"text": "fine text", "model": 7}, ("model",)),
    "empty_model": ({"text": "fine text", "model": ""}, ("model",)),
    "lone_low_surrogate": ({"text": "\udc00", "model": LOCAL_MODEL}, ("surrogate", "unicode", "utf", "text", "encod", "invalid")),
    "lone_high_surrogate": ({"text": "a\ud800", "model": LOCAL_MODEL}, ("surrogate", "unicode", "utf", "text", "encod", "invalid")),
}
BAD_IDS = ["newline", "number", "upper", "short", "missing", "huge"]


@attrs.frozen
class EntrySpec:
    kind: str  # valid | defect:<name> | bad_id:<how> | unknown_type | unserved_model | not_an_object | deep
    text: str = ""
    bare: bool = False  # content as a bare string (older tasks)
    model: str | None = LOCAL_MODEL  # None: no model key (the default applies)
    extras: dict[str, Any] = attrs.field(factory=dict)
    value: Any = None  # not_an_object: the value; deep: the depth
    duplicate: bool = False


def valid_entries() -> st.SearchStrategy[EntrySpec]:
    return st.builds(
        EntrySpec, kind=st.just("valid"), text=SAFE_TEXT, bare=st.booleans(), model=st.sampled_from([LOCAL_MODEL, None]),
        extras=st.fixed_dictionaries({}, optional={"__v": JSON, "createdAt": ISO | JSON, "callbackParams": JSON, "extraField": JSON,
                                                   "updatedAt": JSON, "state": st.just("pending")}),
        duplicate=st.booleans(),
    )


def hostile_entries() -> st.SearchStrategy[EntrySpec]:
    return st.one_of(
        valid_entries(),
        st.builds(EntrySpec, kind=st.sampled_from([f"defect:{k}" for k in DEFECTS])),
        st.builds(EntrySpec, kind=st.sampled_from([f"bad_id:{k}" for k in BAD_IDS])),
        st.builds(EntrySpec, kind=st.just("unknown_type"), value=JSON),
        st.builds(EntrySpec, kind=st.just("unserved_model")),
        st.builds(EntrySpec, kind=st.just("not_an_object"), value=LEAF | st.lists(JSON, max_size=3)),
        st.builds(EntrySpec, kind=st.just("deep"), value=st.integers(30, 400)),
    )


def offer(world: World, spec: EntrySpec, index: int, *, model: str = LOCAL_MODEL, default: str | None = None) -> None:
    """Put `spec` into the world's pending list as bytes, with what it may become (`model`:
    the served model valid entries name; `default`: the mode's DEFAULT_MODEL, which a
    content without a model key gets, `model` when not given)."""
    tid = world.sandbox.new_id()
    base: dict[str, Any] = {"_id": tid, "type": "text_embedding", "state": "pending"}
    kind = spec.kind
    if kind == "valid":
        text = f"t{index} {spec.text}"
        named = not spec.bare and spec.model is not None
        content: Any = text if spec.bare else ({"text": text, "model": model} if named else {"text": text})
        raw = json_raw({**spec.extras, **base, "content": content})
        if spec.duplicate:
            raw = raw + b"," + raw  # listed twice in the same array while it is pending
        world.offer_raw(raw, key=tid, expect="succeed", text=text, model=model if named else (default or model), note=f"valid {spec}")
        return
    if kind.startswith("defect:"):
        content, words = DEFECTS[kind.split(":", 1)[1]]
        world.offer_raw(json_raw({**base, "content": content}), key=tid, expect="defect", words=words, note=kind)
        return
    if kind.startswith("bad_id:"):
        how = kind.split(":", 1)[1]
        bad: Any = {"newline": tid + "\n", "number": 12345, "upper": tid.upper(), "short": tid[:23], "huge": 2**80}.get(how)
        entry = {**base, "content": {"text": f"bad id {index}", "model": LOCAL_MODEL}}
        if how == "missing":
            del entry["_id"]
        else:
            entry["_id"] = bad
        world.offer_raw(json_raw(entry), key=bad if isinstance(bad, str) else None, expect="stay", note=kind)
        return
    if kind == "unknown_type":
        t = spec.value if spec.value != "text_embedding" else "image_caption"
        world.offer_raw(json_raw({**base, "type": t, "content": {"text": "x", "model": LOCAL_MODEL}}), key=tid, expect="stay", note=kind)
        return
    if kind == "unserved_model":
        world.offer_raw(json_raw({**base, "content": {"text": f"unserved {index}", "model": "no-such-model"}}), key=tid, expect="stay", note=kind)
        return
    if kind == "not_an_object":
        world.offer_raw(json_raw(spec.value), key=None, expect="stay", note=kind)
        return
    if kind == "deep":
        world.offer_raw(b"[" * spec.value + b"]" * spec.value, key=None, expect="stay", note=f"nested {spec.value} deep")
        return
    raise AssertionError(kind)


# --- the peers ----------------------------------------------------------------------------

PENDING_SHAPES = st.one_of(
    st.none(),
    st.builds(PendingShape, mode=st.just("raw"), raw=st.sampled_from([b"{}", b"null", b"<html><body>maintenance</body></html>", b"[1,"]),
              count=st.integers(1, 3)),
    st.builds(PendingShape, mode=st.just("wrap"), count=st.integers(1, 3)),
    st.builds(PendingShape, truncate_at=st.integers(1, 4000), count=st.integers(1, 3)),
    st.builds(PendingShape, drip_bytes=st.integers(16, 512), drip_interval=st.sampled_from([0.005, 0.02]), count=st.integers(1, 2)),
)
TOKEN_ANSWERS = st.one_of(
    st.none(),
    st.builds(TokenAnswer, fields=st.fixed_dictionaries({"expires_in": st.sampled_from([b"NaN", b"-1", b"0", b"1e12", b'"3600"', b"null", b"1.5"])}),
              count=st.integers(1, 3)),
    st.builds(TokenAnswer, fields=st.just({"access_token": b'"tok-\\u00e4\\u00f6-0123456789"'}), count=st.integers(1, 2)),
    st.builds(TokenAnswer, drop=st.sampled_from([("access_token",), ("token_type",), ("expires_in",)]), count=st.integers(1, 3)),
    st.builds(TokenAnswer, fields=st.just({"token_type": b'"mac"'}), count=st.integers(1, 2)),
    st.builds(TokenAnswer, fields=st.just({"token_type": b'"Bearer"'})),
    st.builds(TokenAnswer, raw=st.sampled_from([b"<html>login</html>", b"{}", b"[]"]), count=st.integers(1, 2)),
)


def faults() -> st.SearchStrategy[Fault]:
    return st.one_of(
        st.builds(Fault, status=st.sampled_from([500, 502, 503, 504, 429, 408]), probability=st.floats(0.2, 0.7), count=st.integers(1, 8),
                  apply=st.booleans()),
        # 4xx from a proxy or gateway in front of the API, not applied (a 400 from the API itself
        # means a bad id, state or result, or a refused result: none of them for these tasks)
        st.builds(Fault, status=st.sampled_from([401, 403, 409, 422]), probability=st.floats(0.2, 0.7), count=st.integers(1, 4)),
        st.builds(Fault, drop=st.just(True), apply=st.booleans(), probability=st.floats(0.2, 0.7), count=st.integers(1, 6)),
        st.builds(Fault, status=st.just(0), hang=st.floats(0.2, 1.5), probability=st.floats(0.2, 0.5), count=st.integers(1, 3)),
    )


ROUTE_FAULTS = st.dictionaries(st.sampled_from(["token", "pending", "claim", "report", "release", "list"]), faults(), max_size=4)
BACKEND_ANSWERS = st.lists(
    st.builds(Answer, kind=st.sampled_from(["status", "html", "null", "no_data", "wrong_count", "wrong_dims", "nan", "wrong_types",
                                            "truncated", "reset"]),
              status=st.sampled_from([500, 502, 503, 429]), probability=st.floats(0.2, 0.8), count=st.integers(1, 4)),
    max_size=3,
)
