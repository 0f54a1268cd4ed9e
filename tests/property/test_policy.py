"""The error table: one test per row that matters, and totality."""

from __future__ import annotations

import pytest

from processor.pure import policy
from processor.pure.breaker import Outcome as Breaker
from processor.pure.faults import Dependency as D
from processor.pure.faults import Fault as F
from processor.pure.policy import Action as A


@pytest.mark.parametrize("dep", [D.EMBEDDING, D.CHAT])
@pytest.mark.parametrize(
    ("fault", "now", "lone"),
    [
        (F.INPUT, A.SPLIT, A.FAIL_TASK),
        (F.SERVER, A.SPLIT, A.RETRY_LATER),
        (F.TIMEOUT, A.SPLIT, A.RETRY_LATER),
        (F.BUSY, A.RETRY, A.RELEASE),
        (F.RATE_LIMITED, A.PACE, A.RELEASE),
        (F.UNREACHABLE, A.RETRY, A.BACKEND_UNUSABLE),
        (F.MALFORMED, A.RETRY, A.RETRY_LATER),
        (F.BAD_ANSWER, A.RETRY, A.RETRY_LATER),

        (F.DIMENSION, A.BACKEND_UNUSABLE, A.RELEASE),
        (F.AUTH, A.BACKEND_UNUSABLE, A.RELEASE),
        (F.QUOTA, A.BACKEND_UNUSABLE, A.RELEASE),
        (F.MODEL_MISSING, A.MODEL_UNUSABLE, A.RELEASE),
    ],
)
def test_backend_rows(dep: D, fault: F, now: A, lone: A) -> None:
    r = policy.rule(dep, fault)
    assert r.action is now
    assert policy.after_retries(r, group_size=1) is lone
    if now is A.SPLIT:
        assert policy.after_retries(r, group_size=2) is A.SPLIT


@pytest.mark.parametrize(("dep", "now", "then"), [(D.EMBEDDING, A.BACKEND_UNUSABLE, A.RELEASE),
                                                  (D.CHAT, A.RETRY, A.BACKEND_UNUSABLE)])
def test_a_refused_parameter(dep: D, now: A, then: A) -> None:
    """Embeddings: a configuration problem at once. Chat: the adapter drops the parameter the
    model refused, so one retry first (the breaker is shared with the backend's embeddings)."""
    r = policy.rule(dep, F.PARAMETER)
    assert r.action is now and policy.after_retries(r, group_size=1) is then


def test_only_input_faults_fail_a_task() -> None:
    """CONTRACT §1: failing is only for the task's own defect."""
    for (dep, fault), r in policy.POLICY.items():
        for size in (1, 2):
            if A.FAIL_TASK in (r.action, policy.after_retries(r, group_size=size)):
                assert fault is F.INPUT, (dep, fault)


def test_busy_and_rate_limits_never_trip_a_breaker_nor_count_attempts() -> None:
    for dep in (D.EMBEDDING, D.CHAT):
        for fault in (F.BUSY, F.RATE_LIMITED):
            r = policy.rule(dep, fault)
            assert r.breaker is Breaker.IGNORED and not r.counts_attempt


@pytest.mark.parametrize(
    ("fault", "action"),
    [(F.TOKEN_EXPIRED, A.REFRESH_TOKEN), (F.REFUSED, A.GIVE_UP), (F.NOT_FOUND, A.GONE), (F.SERVER, A.RETRY),
     (F.MALFORMED, A.RETRY), (F.RATE_LIMITED, A.PACE), (F.AUTH, A.GIVE_UP)],
)
def test_task_api_rows(fault: F, action: A) -> None:
    assert policy.rule(D.TASK_API, fault).action is action


def test_token_rows() -> None:
    assert policy.rule(D.TOKEN, F.AUTH).action is A.BACKEND_UNUSABLE
    assert policy.rule(D.TOKEN, F.MALFORMED).action is A.RETRY


def test_wikidata_never_holds_a_result_back() -> None:
    for fault in F:
        r = policy.rule(D.WIKIDATA, fault)
        assert policy.after_retries(r, group_size=1) in (A.GO_WITHOUT, A.RELEASE)


def test_every_pair_has_an_answer_and_unknown_pairs_never_fail() -> None:
    for dep in D:
        for fault in F:
            r = policy.rule(dep, fault)
            assert isinstance(r.action, A)
    assert policy.rule(D.STORE, F.INPUT).then is A.RELEASE
    assert len(policy.table_rows()) == len(policy.POLICY)
