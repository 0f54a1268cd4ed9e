"""Task kinds: what each task type means to this processor.

A kind says how a task's `content` is parsed, which tasks may share one backend call, how
the call is made and its answer checked, and what is reported as the result. The stages
are the same for every kind. Built-in kinds and plug-ins register under the entry-point
group `processor.task_types` (see `processor.kinds.registry` and docs/adding-a-task-type.md).
"""

from processor.kinds.base import Computed, Content, Defect, KindPorts, TaskKind, Work

__all__ = ["Computed", "Content", "Defect", "KindPorts", "TaskKind", "Work"]
