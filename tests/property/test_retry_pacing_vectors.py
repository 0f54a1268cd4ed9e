"""Retry schedule, classification, budget; polling pace and token refresh; vector check."""

import math

from hypothesis import given
from hypothesis import strategies as st

from processor.pure import pacing, retry, vectors
from processor.pure.retry import ErrorKind

policies = st.builds(
    retry.RetryPolicy,
    max_retries=st.integers(0, 10),
    base=st.floats(0.01, 5),
    factor=st.floats(1, 4),
    cap=st.floats(0.1, 120),
    deadline=st.none() | st.floats(1, 600),
    max_retry_after=st.floats(1, 300),
)


@given(policies, st.integers(0, 100), st.floats(0, 1, exclude_max=True))
def test_backoff_is_full_jitter_within_cap(policy, attempt, draw):
    d = retry.backoff(policy, attempt, draw)
    assert 0 <= d <= policy.cap
    assert d <= policy.base * policy.factor ** min(attempt, 200) + 1e-9


@given(policies, st.integers(0, 20), st.floats(0, 1000), st.sampled_from(list(ErrorKind)), st.floats(0, 1, exclude_max=True), st.none() | st.floats(0, 500))
def test_decide_obeys_limits(policy, attempt, elapsed, kind, draw, retry_after):
    d = retry.decide(policy, attempt=attempt, elapsed=elapsed, kind=kind, draw=draw, retry_after=retry_after)
    if kind is ErrorKind.PERMANENT or attempt >= policy.max_retries:
        assert isinstance(d, retry.GiveUp)
    if isinstance(d, retry.Retry):
        if retry_after is not None:
            assert d.delay == retry_after <= policy.max_retry_after
        assert policy.deadline is None or elapsed + d.delay <= policy.deadline
    if retry_after is not None and retry_after > policy.max_retry_after and kind is not ErrorKind.PERMANENT and attempt < policy.max_retries:
        assert isinstance(d, retry.GiveUp) and "cap" in d.reason


def test_classification_table():
    assert retry.classify_status(500) is ErrorKind.RETRYABLE
    assert retry.classify_status(503) is ErrorKind.RETRYABLE
    assert retry.classify_status(408) is ErrorKind.RETRYABLE
    assert retry.classify_status(429) is ErrorKind.RATE_LIMITED
    assert retry.classify_status(429, quota_exhausted=True) is ErrorKind.PERMANENT
    assert retry.classify_status(401) is ErrorKind.AUTH
    for s in (400, 403, 404, 409, 422):
        assert retry.classify_status(s) is ErrorKind.PERMANENT


@given(st.lists(st.booleans(), max_size=500))
def test_retry_budget_caps_retries_to_a_fraction_of_requests(ops):
    b = retry.RetryBudget(ratio=0.2, cap=20, balance=10)
    requests = retries = 0
    for is_request in ops:
        if is_request:
            b = retry.on_request(b)
            requests += 1
        else:
            b, ok = retry.try_spend(b)
            retries += ok
    assert retries <= 10 + 0.2 * requests + 1e-9
    assert 0 <= b.balance <= 20


@given(st.floats(0, 1, exclude_max=True), st.floats(0.1, 3600))
def test_poll_delay(draw, interval):
    assert pacing.poll_delay(pacing.PollOutcome.NEW_WORK, interval, draw) == 0
    d = pacing.poll_delay(pacing.PollOutcome.NOTHING_NEW, interval, draw)
    assert 0.9 * interval - 1e-9 <= d <= 1.1 * interval + 1e-9


@given(st.floats(0, 1e6), st.none() | st.floats(1, 86400))
def test_token_refresh_before_expiry_and_not_too_early(t0, expires_in):
    at = pacing.token_refresh_at(t0, expires_in)
    life = expires_in or pacing.DEFAULT_TOKEN_LIFETIME
    assert t0 + 0.9 * life - 1e-6 <= at < t0 + life  # one request per lifetime, always before expiry
    assert at <= t0 + life - min(pacing.TOKEN_LEEWAY, 0.1 * life) + 1e-6


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.text(max_size=2) | st.none(), max_size=20), st.none() | st.integers(1, 20))
def test_check_vector_only_passes_finite_vectors_of_the_right_size(v, dim):
    out = vectors.check_vector(v, dim)
    ok = bool(v) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v) and (dim is None or len(v) == dim)
    assert isinstance(out, vectors.VectorOk) == ok


def test_check_batch_learns_dimension_from_first_answer():
    verdicts, dim = vectors.check_batch([[1.0, 0.0], [0.0, 1.0, 0.0]], 2, None)
    assert dim == 2 and isinstance(verdicts[0], vectors.VectorOk) and isinstance(verdicts[1], vectors.VectorBad)
    verdicts, _ = vectors.check_batch([[1.0]], 2, None)
    assert all(isinstance(v, vectors.VectorBad) for v in verdicts)
