"""The task-kind seam.

The stages never look inside a task's content or result: they ask its kind.

* `parse(content)` (pure) turns the task's `content` into `Content` (text, model, kind
  parameters) or a `Defect` (the content can never be computed: the task is failed with
  the reason);
* `group_key(work)` says which claimed tasks may share one backend call (embeddings: same
  backend and model; chat kinds: every task alone), `max_group` how many at most;
* `compute(ports, works, timeout=...)` makes the call and checks the answer. It returns one
  entry per work, in order: a `Computed` (the JSON value to report) or a `DependencyError`
  about that task alone (e.g. `Fault.BAD_ANSWER`, `Fault.MALFORMED`). A fault of the
  whole call is raised as a `DependencyError`; the stage looks up what to do in
  `processor.pure.policy` (split the group, retry, release, mark the model unusable, ...).
  A `Computed` carries the call's real token usage in `meta["usage"]` (a `Usage`, the
  totals of the whole call, the same object on each of its results) when the backend
  reported it; token and spend budgets are settled from it.
* `demand(work)` (optional): what the task may cost at most (`processor.pure.ratelimit.Demand`),
  reserved before the claim when a token or spend budget is on. A kind without it is
  reserved its text's UTF-8 bytes.

A kind is stateless apart from what it was built with: `make(settings) -> TaskKind` is
the factory an entry point names.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol

import attrs

from processor.pure.faults import Dependency, DependencyError
from processor.pure.tasks import Backend


@attrs.frozen
class Content:
    """A task's content as its kind understood it. `model` None: the configured default."""

    text: str
    model: str | None
    params: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Defect:
    """The task's content can never be computed; `detail` is a sentence a person can act on."""

    reason: str  # a short label (metric value), e.g. "invalid_content"
    detail: str


@attrs.frozen
class Work:
    """One claimed task, parsed and routed: everything the compute step needs."""

    id: str
    type: str
    text: str
    model: str  # the model that is called (after MODEL_MAP)
    backend: Backend
    params: Mapping[str, Any] = attrs.field(factory=dict)
    created_at: float | None = None  # epoch seconds, when the API says
    requested_model: str | None = None  # what the task asked for, when MODEL_MAP changed it


@attrs.frozen
class Usage:
    """The tokens one backend call used, as the backend reported them (all of its
    attempts, for a kind that asks again)."""

    tokens_in: int
    tokens_out: int = 0


def priced_model(work: Work) -> str | None:
    """The model a task's spend is priced by: None for a local backend (Ollama, in-process),
    which costs nothing; the mock is priced like the model it stands in for."""
    return work.model if work.backend in (Backend.OPENAI, Backend.MOCK) else None


@attrs.frozen
class Computed:
    """A result ready to report. `meta` is logged with the report (model, template, tokens);
    `meta["usage"]`, when present, is the call's `Usage`."""

    task_id: str
    result: Any
    meta: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class KindPorts:
    """The adapters a kind may call. Missing families are empty mappings / None."""

    embedding: Mapping[Backend, Any] = attrs.field(factory=dict)  # EmbeddingBackend per backend
    chat: Mapping[Backend, Any] = attrs.field(factory=dict)  # chat adapters per backend
    wikidata: Any = None  # the Wikidata adapter, when a kind needs it
    # token and spend budgets, when on: `await budget.again(work)` reserves one more call for
    # a task before a kind asks again (False: no room; hand the task back)
    budget: Any = None


class TaskKind(Protocol):
    type: str  # the task `type` this kind runs, e.g. "text_embedding"
    dependency: Dependency  # the backend family that serves it (EMBEDDING or CHAT)

    def parse(self, content: object) -> Content | Defect: ...

    def group_key(self, work: Work) -> Hashable: ...

    def max_group(self, work: Work, ports: KindPorts) -> int: ...

    async def compute(
        self, ports: KindPorts, works: Sequence[Work], *, timeout: float | None = None
    ) -> Sequence[Computed | DependencyError]: ...
