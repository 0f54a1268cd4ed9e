"""The task lifecycle, driven directly: every reachable path keeps its promises."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from processor.pure import lifecycle as lc
from processor.pure.lifecycle import Effect, Event, Phase


def test_an_event_a_phase_does_not_allow_raises() -> None:
    with pytest.raises(lc.IllegalTransition):
        lc.fire(lc.Record("a" * 24), Event.REPORT_OK)
    dropped = lc.fire(lc.Record("a" * 24), Event.NOT_ADMITTED).record
    for ev in Event:
        with pytest.raises(lc.IllegalTransition):
            lc.fire(dropped, ev, charges=(1,), outcome=lc.Outcome.success([1.0]))


def test_terminal_phases_allow_nothing() -> None:
    for phase in lc.TERMINAL:
        assert lc.allowed(phase) == frozenset()


def test_refund_only_before_a_backend_saw_the_task() -> None:
    r = lc.fire(lc.Record("b" * 24), Event.RESERVE, charges=("c",)).record
    r = lc.fire(r, Event.CLAIM_SENT).record
    r = lc.fire(r, Event.CLAIM_OK).record
    assert lc.may_refund(r)
    r = lc.fire(r, Event.DISPATCH).record
    assert not lc.may_refund(r)
    step = lc.fire(r, Event.RELEASE)
    assert Effect.REFUND not in step.effects and Effect.PATCH_PENDING in step.effects


def test_a_refused_success_is_reported_failed_once_then_the_story_ends() -> None:
    r = lc.Record("c" * 24, Phase.COMPUTED, outcome=lc.Outcome.success([0.1]))
    step = lc.fire(r, Event.REPORT_REFUSED, why="400 wrong shape")
    assert step.record.phase is Phase.COMPUTED and step.record.outcome is not None
    assert step.record.outcome.state == "failed" and "400 wrong shape" in (step.record.outcome.reason or "")
    assert step.effects == (Effect.WRITE_OUTBOX, Effect.PATCH_FINAL)
    end = lc.fire(step.record, Event.REPORT_REFUSED, why="again")
    assert end.record.phase is Phase.REPORTED and Effect.DELETE_JOURNAL in end.effects


def test_recovered_rows_never_refund_what_may_have_reached_a_backend() -> None:
    r = lc.fire(lc.Record("d" * 24), Event.RECOVERED_DISPATCHED).record
    assert Effect.REFUND not in lc.fire(r, Event.RELEASE).effects
    r = lc.fire(lc.Record("d" * 24), Event.RECOVERED_CLAIM, charges=("x",)).record
    assert Effect.REFUND in lc.fire(r, Event.RELEASE).effects


class LifecycleMachine(RuleBasedStateMachine):
    """Random events against one task; the table answers, and the story stays consistent."""

    def __init__(self) -> None:
        super().__init__()
        self.record = lc.Record("e" * 24)
        self.refunds = 0
        self.charged = False
        self.dispatched = False
        self.journal = False
        self.patched_final = 0
        self.history: list[Phase] = [self.record.phase]

    @rule(event=st.sampled_from(list(Event)))
    def fire(self, event: Event) -> None:
        legal = event in lc.allowed(self.record.phase)
        try:
            step = lc.fire(self.record, event, charges=("unit",), outcome=lc.Outcome.success([1.0]), why="no")
        except lc.IllegalTransition:
            assert not legal
            return
        assert legal
        for eff in step.effects:
            if eff is Effect.REFUND:
                self.refunds += 1
                assert not self.dispatched, "a unit that reached a backend was refunded"
            elif eff is Effect.WRITE_JOURNAL:
                self.journal = True
            elif eff is Effect.DELETE_JOURNAL:
                self.journal = False
            elif eff is Effect.PATCH_FINAL:
                self.patched_final += 1
        if event in (Event.RESERVE, Event.RECOVERED_CLAIM):
            self.charged = True
        if event in (Event.DISPATCH, Event.RECOVERED_DISPATCHED):
            self.dispatched = True
        self.record = step.record
        self.history.append(self.record.phase)

    @invariant()
    def at_most_one_refund(self) -> None:
        assert self.refunds <= 1

    @invariant()
    def no_release_after_a_result(self) -> None:
        if Phase.COMPUTED in self.history:
            assert self.record.phase in (Phase.COMPUTED, Phase.REPORTED, Phase.ABANDONED)

    @invariant()
    def terminal_means_journal_settled(self) -> None:
        # a finished story leaves no journal row, except LEFT (for the next start) and
        # DROPPED before the row was written
        if self.record.phase in (Phase.REPORTED, Phase.RELEASED, Phase.ABANDONED):
            assert not self.journal

    @precondition(lambda self: self.record.phase is Phase.REPORTED)
    @rule()
    def reported_only_after_a_final_patch(self) -> None:
        assert self.patched_final >= 1


TestLifecycle = LifecycleMachine.TestCase


def test_every_story_that_forgets_a_task_lets_go_of_its_lease() -> None:
    """A record forgotten while its lease (or this replica's note that it was lost) stays
    behind is held forever: renewed, so no replica can claim the task again."""
    for (phase, event), (_, effects) in lc.TRANSITIONS.items():
        if Effect.FORGET in effects:
            assert Effect.RELEASE_LEASE in effects or Effect.COMPLETE_LEASE in effects, (phase, event)
