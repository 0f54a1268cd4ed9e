"""Which task types this worker runs: the built-in kinds plus plug-ins.

A kind is registered under the entry-point group `processor.task_types`; the entry point
names a factory `make(settings) -> TaskKind`. The built-in kinds are listed here as well,
so a source checkout without installed metadata still runs them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Mapping
from importlib.metadata import entry_points
from typing import Any

from processor.kinds.base import TaskKind

GROUP = "processor.task_types"
BUILTIN: Mapping[str, str] = {
    "text_embedding": "processor.kinds.embedding:make",
    "identifying_data": "processor.kinds.identifying_data:make",
    "defining_topics": "processor.kinds.defining_topics:make",
    "defining_impact_area": "processor.kinds.defining_impact_area:make",
    "defining_severity": "processor.kinds.defining_severity:make",
}


class RegistryError(Exception):
    """A task type cannot be loaded (bad plug-in, duplicate name, unknown type asked for)."""


def _load_target(target: str) -> Callable[[Any], TaskKind]:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def available() -> dict[str, str]:
    """Task type -> factory target, built-ins first, then installed plug-ins."""
    found = dict(BUILTIN)
    for ep in entry_points(group=GROUP):
        if ep.name in found and found[ep.name] != ep.value:
            raise RegistryError(f"task type {ep.name!r} is registered twice ({found[ep.name]} and {ep.value})")
        found[ep.name] = ep.value
    return found


def load(settings: Any, enabled: Collection[str] | None = None) -> dict[str, TaskKind]:
    """Build the kinds this worker runs. `enabled` None: every available type."""
    targets = available()
    names = list(targets) if enabled is None else list(enabled)
    unknown = [n for n in names if n not in targets]
    if unknown:
        raise RegistryError(f"unknown task type(s) {', '.join(unknown)}; available: {', '.join(sorted(targets))}")
    kinds: dict[str, TaskKind] = {}
    for name in names:
        try:
            kind = _load_target(targets[name])(settings)
        except Exception as exc:  # a broken plug-in is a start-up error with its name
            raise RegistryError(f"task type {name!r} ({targets[name]}) cannot be loaded: {exc}") from None
        if getattr(kind, "type", None) != name:
            raise RegistryError(f"task type {name!r}: its factory built a kind of type {getattr(kind, 'type', None)!r}")
        kinds[name] = kind
    return kinds
