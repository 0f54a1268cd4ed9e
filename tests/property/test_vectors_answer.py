"""A backend's whole answer: usable as a whole, or bad as a whole (MALFORMED / DIMENSION)."""

import math

from hypothesis import given
from hypothesis import strategies as st

from processor.pure import vectors

numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**70), 2**70) | st.booleans()
values = numbers | st.text(max_size=2) | st.none()
vector = st.lists(values, max_size=6)
answers = st.lists(vector | values, max_size=5) | values


def _finite_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@given(answers, st.integers(0, 5), st.none() | st.integers(1, 6))
def test_an_answer_is_usable_exactly_when_every_vector_is_finite_and_of_one_size(raw, n, expected):
    out = vectors.check_answer(raw, n, expected)
    fine = (
        isinstance(raw, list)
        and len(raw) == n
        and all(isinstance(v, list) and v and all(_finite_number(x) for x in v) for v in raw)
        and len({len(v) for v in raw}) <= 1
    )
    same_size = fine and (expected is None or not raw or len(raw[0]) == expected)
    assert isinstance(out, vectors.AnswerOk) == same_size
    if isinstance(out, vectors.AnswerOk):
        assert len(out.vectors) == n and all(len(v) == out.dim for v in out.vectors)
        assert all(isinstance(x, float) for v in out.vectors for x in v)
    else:
        # a dimension mismatch only when the answer is otherwise fine
        assert out.dimension == (fine and not same_size)
        if out.dimension:
            assert out.size == len(raw[0]) != expected


@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8))
def test_one_wrong_size_for_the_whole_batch_is_a_dimension_mismatch(n, dim, expected):
    out = vectors.check_answer([[0.5] * dim for _ in range(n)], n, expected)
    assert isinstance(out, vectors.AnswerBad if dim != expected else vectors.AnswerOk)
    if dim != expected:
        assert out.dimension and out.size == dim and f"expected {expected}" in out.reason
