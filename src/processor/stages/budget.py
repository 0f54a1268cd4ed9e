"""Token and spend budgets in the stages (RATE_LIMIT_TOKENS_PER_*, SPEND_LIMIT_PER_*).

* Before the claim, each task reserves what it may cost at most (`demands`: its kind's
  `demand`, an upper bound of its tokens, priced by its model), beside its task units.
* After a call that answered, its tasks' reservations are replaced by the call's real
  usage (`settle_call`, from `Computed.meta["usage"]`). Room a settlement frees lifts a
  pause a budget caused, so waiting tasks go at once.
* What never reached a backend is refunded whole by the lifecycle; what reached one and
  did not answer with a usage stays spent at its reservation (an upper bound: the
  counters may overstate what was spent, never understate it).
* A task whose model has no price while a spend cap is on, or that alone needs more than
  a tier's whole limit, stays pending (never failed): counted, logged once per model, named
  in /health, and not taken again for `RECENT_TTL` seconds.

Nothing here runs unless the global limiter has a token or spend tier (`budgets_on`).
The stage's port is `Budgets`: the admission (the limiter), the book, the backend board,
metrics, the task kinds (their `demand`) and FALLBACK_MODELS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from processor.board import Admission, BackendBoard
from processor.book import Book
from processor.effects.limiter import LimiterError
from processor.effects.logs import get_logger
from processor.effects.metrics import Metrics
from processor.kinds.base import Computed, TaskKind, Usage, Work, priced_model
from processor.pure import ratelimit as rl
from processor.pure.faults import Fault
from processor.pure.lifecycle import Event
from processor.pure.tasks import Backend

# Faults of a failed attempt that the provider does not bill (it refused the request before
# doing the work); after any other one (no answer, a 5xx, a malformed answer) the work may
# have been done and billed.
NOT_BILLED = frozenset({Fault.RATE_LIMITED, Fault.QUOTA, Fault.AUTH, Fault.BUSY, Fault.INPUT, Fault.PARAMETER,
                        Fault.MODEL_MISSING})

REASONS = {
    rl.Refusal.NO_PRICE: "no_price",
    rl.Refusal.TOO_BIG: "too_big",
}


@attrs.frozen
class Budgets:
    """What the budget stage touches."""

    admission: Admission
    book: Book
    board: BackendBoard
    metrics: Metrics
    kinds: Mapping[str, TaskKind]
    fallback_models: Mapping[str, str] = attrs.field(factory=dict)


def budgets_on(bp: Budgets) -> bool:
    return bool(getattr(bp.admission.limiter, "budgets", False))


def demand_of(bp: Budgets, work: Work) -> rl.Demand:
    """What `work` may cost at most. An Ollama embedding with a fallback to OpenAI
    (FALLBACK_MODELS) is priced by its fallback, which may serve it (settled at no cost
    when Ollama does)."""
    kind = bp.kinds.get(work.type)
    fn = getattr(kind, "demand", None)
    d: rl.Demand = fn(work) if fn is not None else rl.Demand.upper_bound(work.text, priced_model(work))
    if work.backend is Backend.OLLAMA and work.type == "text_embedding" and Backend.OPENAI in bp.board.adapters:
        fallback = bp.fallback_models.get(work.model)
        if fallback:
            d = attrs.evolve(d, model=fallback)
    return d


def demands(bp: Budgets, works: Sequence[Work]) -> list[rl.Demand]:
    return [demand_of(bp, w) for w in works]


def call_usage(answers: Sequence[object]) -> Usage | None:
    """The usage a call's results carry (the same `Usage` on each), or None."""
    for a in answers:
        if isinstance(a, Computed):
            u = a.meta.get("usage")
            if isinstance(u, Usage):
                return u
    return None


async def settle_call(bp: Budgets, works: Sequence[Work], answers: Sequence[object], *, retried: bool) -> None:
    """Replace the reservations of a call's tasks by the call's real usage (all of its
    tasks, those whose answer was unusable too: they reached the backend). A call that
    needed retries keeps its reservations (an attempt before the one that answered may
    have been billed as well: `NOT_BILLED`), and so does one whose backend reported no
    usage."""
    if retried:
        return
    usage = call_usage(answers)
    if usage is None:
        return
    reservations: list[rl.Reservation] = []
    for w in works:
        rec = bp.book.records.get(w.id)
        if rec is not None:
            # priced by the model that served the call (a fallback's reservation back to no
            # cost when Ollama served it; the fallback's price when it did)
            model = priced_model(w)
            reservations += [r if r.model == model else attrs.evolve(r, model=model)
                             for name, r in rec.charges if name == "global" and isinstance(r, rl.Reservation) and r.charges]
    if not reservations:
        return
    await bp.admission.limiter.settle(reservations, tokens_in=usage.tokens_in, tokens_out=usage.tokens_out)
    bp.admission.budget_freed()


class BudgetPort:
    """`KindPorts.budget`: one more call's reservation for a task a kind asks again."""

    def __init__(self, budgets: Budgets) -> None:
        self._budgets = budgets

    async def again(self, work: Work) -> bool:
        bp = self._budgets
        try:
            decision = await bp.admission.limiter.admit([demand_of(bp, work)])
        except LimiterError as exc:
            get_logger("daemon").warning("budget_reserve_failed", task_id=work.id, error=str(exc))
            return False
        r = decision.reservations[0] if decision.reservations else None
        if r is None:
            return False
        bp.book.add_charge(work.id, ("global", r))
        return True


async def left_pending(bp: Budgets, works: Sequence[Work], refusals: Sequence[rl.Refusal | None], log: Any) -> None:
    """Tasks a budget can never admit as things are (no price, bigger than a tier): counted
    per model, named in /health, logged once per model, dropped (they stay pending) and not
    taken again for a while."""
    now = trio.current_time()
    ids = []
    for w, why in zip(works, refusals, strict=True):
        reason = REASONS.get(why) if why is not None else None
        if reason is None:
            continue
        label, first = bp.board.mark_budget_refused(w.model, reason)
        bp.metrics.budget_refused.labels(reason, label).inc()
        if first:
            log.warning("budget_left_pending", model=w.model, reason=reason, why=bp.board.budget_refused[reason][label],
                        action="tasks of this model stay pending")
        ids.append(w.id)
    bp.book.fire(ids, Event.RESERVE, charges=())  # leased, nothing charged: the lease goes back with it
    await bp.book.move(ids, Event.NOT_ADMITTED)
    for i in ids:
        bp.book.recent[i] = now
        bp.book.recent.move_to_end(i)
