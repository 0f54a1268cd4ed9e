"""Readiness is a pure function of facts: ready exactly when every fact is good, and each
bad fact names itself."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from processor.pure import readiness as rd

texts = st.one_of(st.none(), st.text(min_size=1, max_size=20))
backends = st.builds(rd.BackendFacts, st.sampled_from(["openai", "ollama", "mock"]), breaker_open=st.booleans(),
                     unusable=texts, quota=texts, down=texts)
facts = st.builds(
    rd.Facts, started=st.booleans(), shutting_down=st.booleans(), token=st.booleans(), token_error=texts,
    api_answered_ago=st.one_of(st.none(), st.floats(0, 1000)), api_window=st.floats(1, 500),
    api_breaker_open=st.booleans(), backends=st.lists(backends, max_size=3).map(tuple), store_ok=st.booleans(),
    store_error=texts, redis_error=texts,
)


def _all_good(f: rd.Facts) -> bool:
    return (
        f.started and not f.shutting_down and f.token and f.api_answered_ago is not None
        and f.api_answered_ago <= f.api_window and not f.api_breaker_open and f.store_ok and not f.redis_error
        and all(not b.breaker_open and not b.quota and not b.down for b in f.backends)
    )


@given(facts)
def test_ready_exactly_when_every_fact_is_good(f: rd.Facts) -> None:
    assert (rd.reasons(f) == []) == _all_good(f)


@given(facts)
def test_each_bad_fact_is_named(f: rd.Facts) -> None:
    out = " | ".join(rd.reasons(f))
    if not f.started:
        assert out == "starting"
        return
    if f.shutting_down:
        assert "shutting down" in out
    if f.redis_error:
        assert f"redis unavailable: {f.redis_error}" in out
    for b in f.backends:
        if b.quota:
            assert f"{b.name} quota exhausted: {b.quota}" in out
        if b.breaker_open:
            assert f"{b.name} backend circuit breaker open" in out


def test_defaults_are_ready() -> None:
    assert rd.reasons(rd.Facts()) == []
