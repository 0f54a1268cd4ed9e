"""Whatever `expires_in` a token endpoint sends, the token gets a sane, finite lifetime."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from processor.effects.auth import MAX_TOKEN_LIFETIME, MIN_TOKEN_LIFETIME, expires_in_seconds
from processor.pure import pacing

wire_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**15), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.integers(min_value=0, max_value=10**12).map(str), st.lists(st.integers(), max_size=2),
)


@given(wire_values, st.floats(min_value=0, max_value=1e7))
def test_a_lifetime_is_none_or_positive_and_bounded_and_the_refresh_is_finite(value, now):
    life = expires_in_seconds(value)
    assert life is None or (MIN_TOKEN_LIFETIME <= life <= MAX_TOKEN_LIFETIME and math.isfinite(life))
    at = pacing.token_refresh_at(now, life)
    assert math.isfinite(at) and now < at <= now + MAX_TOKEN_LIFETIME


@given(st.floats(allow_nan=True, allow_infinity=True) | st.none(), st.floats(min_value=0, max_value=1e7))
def test_token_refresh_at_is_finite_for_any_float(expires_in, now):
    at = pacing.token_refresh_at(now, expires_in)
    assert math.isfinite(at) and at > now
