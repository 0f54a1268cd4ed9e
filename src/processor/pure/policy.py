"""What to do after an error: one table from (dependency, fault) to an action.

Adapters classify (`processor.pure.faults`); this table decides; the stage carries the
action out. Reading a row: `action` is what happens now; when the action is RETRY or
SPLIT and retries run out (or the group is a single task), `then` applies. `breaker`
says how the failure counts for the dependency's circuit breaker. `counts_attempt`: a
task handed back after this fault counts one attempt against MAX_TASK_ATTEMPTS, but
only when the same backend answered other requests meanwhile (the backend was healthy, so
the task itself is the likely cause); a task is failed only past that bound.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs

from processor.pure.breaker import Outcome as Breaker
from processor.pure.faults import Dependency as D
from processor.pure.faults import Fault as F


class Action(enum.Enum):
    RETRY = "retry"  # the same call again after a back-off (bounded by attempts, deadline, budget)
    PACE = "pace"  # wait what the server asked (or a back-off), then retry; never trips a breaker
    SPLIT = "split"  # halve the group and try each half; a single task goes to `then`
    FAIL_TASK = "fail_task"  # the task's own defect: report `failed` with the reason
    RETRY_LATER = "retry_later"  # hand the tasks back to pending; may count an attempt
    RELEASE = "release"  # hand the tasks back to pending; never the tasks' fault
    MODEL_UNUSABLE = "model_unusable"  # this deployment cannot serve the model: tasks stay pending, counted
    BACKEND_UNUSABLE = "backend_unusable"  # configuration or credentials: breaker open, not ready, release
    REFRESH_TOKEN = "refresh_token"  # drop the token, get a new one, try once more
    GO_WITHOUT = "go_without"  # optional enrichment: the result goes out without it (counted)
    GIVE_UP = "give_up"  # the call failed for good; the caller's lifecycle event says what it means
    GONE = "gone"  # the task no longer exists at the API


@attrs.frozen
class Rule:
    action: Action
    then: Action | None = None
    breaker: Breaker = Breaker.FAILURE
    counts_attempt: bool = False


A = Action
_IGN = Breaker.IGNORED

_BACKEND: dict[F, Rule] = {
    F.INPUT: Rule(A.SPLIT, then=A.FAIL_TASK, breaker=_IGN),
    F.BAD_ANSWER: Rule(A.RETRY, then=A.RETRY_LATER, breaker=_IGN, counts_attempt=True),
    F.PARAMETER: Rule(A.BACKEND_UNUSABLE, breaker=_IGN),
    F.DIMENSION: Rule(A.BACKEND_UNUSABLE, breaker=_IGN),
    F.AUTH: Rule(A.BACKEND_UNUSABLE, breaker=_IGN),
    F.QUOTA: Rule(A.BACKEND_UNUSABLE, breaker=_IGN),
    F.MODEL_MISSING: Rule(A.MODEL_UNUSABLE, breaker=_IGN),
    F.RATE_LIMITED: Rule(A.PACE, then=A.RELEASE, breaker=_IGN),
    F.BUSY: Rule(A.RETRY, then=A.RELEASE, breaker=_IGN),
    F.SERVER: Rule(A.SPLIT, then=A.RETRY_LATER, counts_attempt=True),
    F.TIMEOUT: Rule(A.SPLIT, then=A.RETRY_LATER, counts_attempt=True),
    F.UNREACHABLE: Rule(A.RETRY, then=A.BACKEND_UNUSABLE),  # down after retries: breaker open, not ready
    F.MALFORMED: Rule(A.RETRY, then=A.RETRY_LATER, counts_attempt=True),
}

_TASK_API: dict[F, Rule] = {
    F.TOKEN_EXPIRED: Rule(A.REFRESH_TOKEN, then=A.RETRY, breaker=_IGN),
    F.RATE_LIMITED: Rule(A.PACE, breaker=_IGN),
    F.BUSY: Rule(A.RETRY),
    F.SERVER: Rule(A.RETRY),
    F.TIMEOUT: Rule(A.RETRY),
    F.UNREACHABLE: Rule(A.RETRY),
    F.MALFORMED: Rule(A.RETRY),
    F.AUTH: Rule(A.GIVE_UP, breaker=_IGN),  # 403: this client may not do that
    F.REFUSED: Rule(A.GIVE_UP, breaker=_IGN),  # 4xx: the API will not apply it
    F.NOT_FOUND: Rule(A.GONE, breaker=_IGN),
    F.INPUT: Rule(A.GIVE_UP, breaker=_IGN),  # our request was bad (e.g. 413): retrying will not help
}

_TOKEN: dict[F, Rule] = {
    F.AUTH: Rule(A.BACKEND_UNUSABLE),  # invalid_client / invalid_scope: the fix is a setting
    F.RATE_LIMITED: Rule(A.PACE, breaker=_IGN),
    **{f: Rule(A.RETRY) for f in (F.BUSY, F.SERVER, F.TIMEOUT, F.UNREACHABLE, F.MALFORMED)},
}

_WIKIDATA: dict[F, Rule] = {
    F.RATE_LIMITED: Rule(A.PACE, then=A.GO_WITHOUT, breaker=_IGN),
    F.BUSY: Rule(A.PACE, then=A.GO_WITHOUT, breaker=_IGN),
    **{f: Rule(A.RETRY, then=A.GO_WITHOUT) for f in (F.SERVER, F.TIMEOUT, F.UNREACHABLE, F.MALFORMED)},
    F.INPUT: Rule(A.GO_WITHOUT, breaker=_IGN),
}

_STATE: dict[F, Rule] = {f: Rule(A.RETRY, then=A.RELEASE) for f in F}

POLICY: Mapping[tuple[D, F], Rule] = {
    **{(D.EMBEDDING, f): r for f, r in _BACKEND.items()},
    **{(D.CHAT, f): r for f, r in _BACKEND.items()},
    # the chat adapter drops a parameter the model refused and asks again: one retry first
    (D.CHAT, F.PARAMETER): Rule(A.RETRY, then=A.BACKEND_UNUSABLE, breaker=_IGN),
    **{(D.TASK_API, f): r for f, r in _TASK_API.items()},
    **{(D.TOKEN, f): r for f, r in _TOKEN.items()},
    **{(D.WIKIDATA, f): r for f, r in _WIKIDATA.items()},
    **{(D.STORE, f): r for f, r in _STATE.items()},
    **{(D.REDIS, f): r for f, r in _STATE.items()},
}

# What a fault nobody wrote a row for means: try again later, never fail a task for it.
DEFAULT = Rule(A.RETRY, then=A.RELEASE)


def rule(dependency: D, fault: F) -> Rule:
    return POLICY.get((dependency, fault), DEFAULT)


def after_retries(r: Rule, *, group_size: int) -> Action:
    """The action once retrying is over (or at once, for SPLIT of a single task)."""
    if r.action is A.SPLIT and group_size > 1:
        return A.SPLIT
    return r.then if r.then is not None else A.RELEASE


def table_rows() -> list[tuple[str, str, str, str, str]]:
    """The table as text rows (dependency, fault, action, then, breaker), for the docs."""
    return [(d.value, f.value, r.action.value, r.then.value if r.then else "—", r.breaker.name.lower())
            for (d, f), r in POLICY.items()]
