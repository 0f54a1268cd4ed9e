"""The life of one task in this process, as a table of plain data.

A task enters when the poller takes it from the pending list and leaves when it is
reported, released (handed back to `pending`), abandoned (another replica owns it now) or
dropped (let go before it was claimed). Every event that moves it is a row of
`TRANSITIONS`; an event a phase does not allow raises `IllegalTransition`. A transition
returns the new record and the effects the shell must carry out, in order (refund the
units, write or delete the journal row, PATCH, write the outbox, ...). The stages never
decide those effects themselves: they fire events and perform what comes back.

    SEEN ──reserve──► RESERVED ──claim_sent──► CLAIMING ──claim_ok──► CLAIMED
     │                   │                       │                      │  dispatch
     └─not_admitted──► DROPPED ◄──claim_refused──┘                      ▼
                                                 claim_unknown    DISPATCHED
                                                      │              │  computed
                         RELEASING ◄──release / retry_later──────────┤
                           │   │                                     ▼
                 release_ok│   │release_failed                    COMPUTED ──report_ok──► REPORTED
                           ▼   ▼                                  (outbox)  ──refused──► COMPUTED (failed)
                       RELEASED  LEFT (journal row kept: sent again, or at the next start)

`lease_lost` moves any claimed phase to ABANDONED (the result, if any, is not reported).
Units charged for a task are refunded only while it has never reached a backend; from
DISPATCHED on they stay spent (the backend may have done the work).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs


class Phase(enum.Enum):
    SEEN = "seen"  # taken from the pending list, counts against the intake
    RESERVED = "reserved"  # units charged (and the lease held, with replicas)
    CLAIMING = "claiming"  # journal row written, PATCH in_progress on its way
    CLAIMED = "claimed"  # the API answered the claim
    DISPATCHED = "dispatched"  # sent to a backend at least once: its units stay spent
    COMPUTED = "computed"  # a result (or a defect's reason) is in the outbox
    RELEASING = "releasing"  # PATCH pending on its way
    REPORTED = "reported"  # the API has the final state
    RELEASED = "released"  # handed back to pending
    LEFT = "left"  # release failed: the journal row stays (sent again later, or at the next start)
    ABANDONED = "abandoned"  # lease lost: another replica may own it; nothing reported
    DROPPED = "dropped"  # let go before the claim took effect


TERMINAL = frozenset({Phase.REPORTED, Phase.RELEASED, Phase.LEFT, Phase.ABANDONED, Phase.DROPPED})


class Event(enum.Enum):
    RESERVE = "reserve"  # units charged; carries the charges
    NOT_ADMITTED = "not_admitted"  # no lease, no quota, backend refused before claim, stopping
    CLAIM_SENT = "claim_sent"  # about to write the journal row and PATCH in_progress
    CLAIM_OK = "claim_ok"
    CLAIM_REFUSED = "claim_refused"  # the API answered and did not apply the claim (4xx)
    CLAIM_UNKNOWN = "claim_unknown"  # no answer or a 5xx: the claim may have been applied
    JOURNAL_FAILED = "journal_failed"  # the journal row could not be written: nothing sent
    DISPATCH = "dispatch"  # handed to a backend
    COMPUTED = "computed"  # a final outcome exists; carries it
    RELEASE = "release"  # hand back, not the task's fault (shutdown, backend down, model unservable)
    RETRY_LATER = "retry_later"  # hand back after failures at the backend: counts an attempt
    RELEASE_OK = "release_ok"
    RELEASE_FAILED = "release_failed"
    REPORT_OK = "report_ok"  # the API took the final state (or the task is gone: 404)
    REPORT_REFUSED = "report_refused"  # 4xx on a `succeeded` report: report `failed` with why
    LEASE_LOST = "lease_lost"
    RECOVERED_CLAIM = "recovered_claim"  # start-up: a journal row, never sent to a backend
    RECOVERED_DISPATCHED = "recovered_dispatched"  # start-up: a journal row that may have reached a backend
    RECOVERED_RESULT = "recovered_result"  # start-up: an outbox row


class Effect(enum.Enum):
    """What the shell must do, in the order a transition lists them."""

    REFUND = "refund"  # give the record's charges back to the limiters
    WRITE_JOURNAL = "write_journal"
    PATCH_IN_PROGRESS = "patch_in_progress"
    MARK_DISPATCHED = "mark_dispatched"  # persist "reached a backend" (units settled: never refund again) in the journal row
    WRITE_OUTBOX = "write_outbox"  # store the record's outcome before reporting it
    PATCH_FINAL = "patch_final"  # report the record's outcome
    PATCH_PENDING = "patch_pending"
    DELETE_JOURNAL = "delete_journal"  # drop journal (and outbox) rows
    COUNT_ATTEMPT = "count_attempt"  # persist one more failed attempt for the task
    RELEASE_LEASE = "release_lease"
    COMPLETE_LEASE = "complete_lease"  # reported: the lease becomes a short `done` marker
    FORGET = "forget"  # the record leaves this process (it stays "known" for a while if reported)


E = Effect
_CLAIMED_PHASES = (Phase.CLAIMED, Phase.DISPATCHED, Phase.COMPUTED, Phase.RELEASING)

# (phase, event) -> (new phase, effects). Nothing else moves a task.
TRANSITIONS: Mapping[tuple[Phase, Event], tuple[Phase, tuple[Effect, ...]]] = {
    (Phase.SEEN, Event.RESERVE): (Phase.RESERVED, ()),
    # a lease taken for it just before (the limiter then failed) goes back; one held by
    # another replica, or by nobody, is left alone (only this replica's own are released)
    (Phase.SEEN, Event.NOT_ADMITTED): (Phase.DROPPED, (E.RELEASE_LEASE, E.FORGET)),
    (Phase.RESERVED, Event.NOT_ADMITTED): (Phase.DROPPED, (E.REFUND, E.RELEASE_LEASE, E.FORGET)),
    (Phase.RESERVED, Event.CLAIM_SENT): (Phase.CLAIMING, (E.WRITE_JOURNAL, E.PATCH_IN_PROGRESS)),
    (Phase.CLAIMING, Event.JOURNAL_FAILED): (Phase.DROPPED, (E.REFUND, E.RELEASE_LEASE, E.FORGET)),
    (Phase.CLAIMING, Event.CLAIM_OK): (Phase.CLAIMED, ()),
    (Phase.CLAIMING, Event.CLAIM_REFUSED): (Phase.DROPPED, (E.REFUND, E.DELETE_JOURNAL, E.RELEASE_LEASE, E.FORGET)),
    (Phase.CLAIMING, Event.CLAIM_UNKNOWN): (Phase.RELEASING, (E.REFUND, E.PATCH_PENDING)),
    (Phase.CLAIMING, Event.RELEASE): (Phase.RELEASING, (E.REFUND, E.PATCH_PENDING)),
    (Phase.CLAIMED, Event.DISPATCH): (Phase.DISPATCHED, (E.MARK_DISPATCHED,)),
    (Phase.DISPATCHED, Event.DISPATCH): (Phase.DISPATCHED, ()),
    (Phase.SEEN, Event.COMPUTED): (Phase.COMPUTED, (E.WRITE_OUTBOX, E.PATCH_FINAL)),  # a defect found at intake
    (Phase.CLAIMED, Event.COMPUTED): (Phase.COMPUTED, (E.WRITE_OUTBOX, E.PATCH_FINAL)),
    (Phase.DISPATCHED, Event.COMPUTED): (Phase.COMPUTED, (E.WRITE_OUTBOX, E.PATCH_FINAL)),
    (Phase.CLAIMED, Event.RELEASE): (Phase.RELEASING, (E.REFUND, E.PATCH_PENDING)),
    (Phase.DISPATCHED, Event.RELEASE): (Phase.RELEASING, (E.PATCH_PENDING,)),
    (Phase.DISPATCHED, Event.RETRY_LATER): (Phase.RELEASING, (E.COUNT_ATTEMPT, E.PATCH_PENDING)),
    (Phase.RELEASING, Event.RELEASE_OK): (Phase.RELEASED, (E.DELETE_JOURNAL, E.RELEASE_LEASE, E.FORGET)),
    # the row stays; marked so that no later release refunds again (its units went back
    # already, or stay spent)
    (Phase.RELEASING, Event.RELEASE_FAILED): (Phase.LEFT, (E.MARK_DISPATCHED, E.RELEASE_LEASE, E.FORGET)),
    (Phase.COMPUTED, Event.REPORT_OK): (Phase.REPORTED, (E.DELETE_JOURNAL, E.COMPLETE_LEASE, E.FORGET)),
    (Phase.COMPUTED, Event.REPORT_REFUSED): (Phase.COMPUTED, (E.WRITE_OUTBOX, E.PATCH_FINAL)),
    (Phase.SEEN, Event.RECOVERED_CLAIM): (Phase.CLAIMED, ()),
    (Phase.SEEN, Event.RECOVERED_DISPATCHED): (Phase.DISPATCHED, ()),
    (Phase.SEEN, Event.RECOVERED_RESULT): (Phase.COMPUTED, (E.PATCH_FINAL,)),
    # (the lease is gone already: letting go of it only ends this replica's record of the loss)
    **{(p, Event.LEASE_LOST): (Phase.ABANDONED, (E.DELETE_JOURNAL, E.RELEASE_LEASE, E.FORGET)) for p in _CLAIMED_PHASES},
    (Phase.CLAIMING, Event.LEASE_LOST): (Phase.ABANDONED, (E.DELETE_JOURNAL, E.RELEASE_LEASE, E.FORGET)),
}


class IllegalTransition(Exception):
    """An event the task's phase does not allow: a bug in the caller, never the world."""


@attrs.frozen
class Outcome:
    """The final state to report: `succeeded` with `result`, or `failed` with `reason`."""

    state: str  # "succeeded" | "failed"
    result: Any = None
    reason: str | None = None

    @classmethod
    def success(cls, result: Any) -> Outcome:
        return cls("succeeded", result, None)

    @classmethod
    def failure(cls, reason: str) -> Outcome:
        return cls("failed", None, reason)


@attrs.frozen
class Record:
    """One task as this process knows it. `charges` are the limiters' receipts (opaque)."""

    task_id: str
    phase: Phase = Phase.SEEN
    charges: tuple[Any, ...] = ()
    outcome: Outcome | None = None
    refused: int = 0  # REPORT_REFUSED seen (a refused `failed` report ends the story)


@attrs.frozen
class Step:
    record: Record
    effects: tuple[Effect, ...]


def allowed(phase: Phase) -> frozenset[Event]:
    return frozenset(ev for (p, ev) in TRANSITIONS if p is phase)


def fire(record: Record, event: Event, *, charges: tuple[Any, ...] = (), outcome: Outcome | None = None,
         why: str | None = None) -> Step:
    """Apply `event` to `record`. Raises IllegalTransition for an event its phase does not allow.

    `charges` go with RESERVE (and RECOVERED_CLAIM), `outcome` with COMPUTED and
    RECOVERED_RESULT, `why` with REPORT_REFUSED (the platform's answer, put in the reason).
    """
    row = TRANSITIONS.get((record.phase, event))
    if row is None:
        raise IllegalTransition(f"task {record.task_id}: {event.value} is not allowed in phase {record.phase.value}")
    phase, effects = row
    new = attrs.evolve(record, phase=phase)
    if event is Event.RESERVE or event is Event.RECOVERED_CLAIM:
        new = attrs.evolve(new, charges=charges)
    elif event is Event.COMPUTED or event is Event.RECOVERED_RESULT:
        if outcome is None:
            raise IllegalTransition(f"task {record.task_id}: {event.value} needs an outcome")
        new = attrs.evolve(new, outcome=outcome)
    elif event is Event.REPORT_REFUSED:
        if record.outcome is None or record.outcome.state == "failed" or record.refused:
            # a refused `failed` report cannot be helped: the story ends, rows go, loudly
            return Step(attrs.evolve(new, phase=Phase.REPORTED), (E.DELETE_JOURNAL, E.COMPLETE_LEASE, E.FORGET))
        new = attrs.evolve(new, refused=record.refused + 1,
                           outcome=Outcome.failure(f"the platform refused the result: {why or 'no reason given'}"[:500]))
    if E.REFUND in effects:
        if not record.charges:
            effects = tuple(e for e in effects if e is not E.REFUND)
        new = attrs.evolve(new, charges=())
    return Step(new, effects)


# -- questions only the lifecycle answers ---------------------------------------------------
def may_refund(record: Record) -> bool:
    """Units may go back only while the task never reached a backend."""
    return bool(record.charges) and record.phase in (Phase.RESERVED, Phase.CLAIMING, Phase.CLAIMED)


def may_release(record: Record) -> bool:
    """A task may be handed back to pending while it holds a claim and no result."""
    return Event.RELEASE in allowed(record.phase)


def holds_claim(record: Record) -> bool:
    """The API may have this task `in_progress` on our behalf."""
    return record.phase in (Phase.CLAIMING, Phase.CLAIMED, Phase.DISPATCHED, Phase.COMPUTED, Phase.RELEASING)


def is_live(record: Record) -> bool:
    return record.phase not in TERMINAL


def table_rows() -> list[tuple[str, str, str, str]]:
    """The transition table as text rows (phase, event, new phase, effects), for the docs."""
    return [(p.value, ev.value, np.value, ", ".join(e.value for e in effs) or "—")
            for (p, ev), (np, effs) in TRANSITIONS.items()]
