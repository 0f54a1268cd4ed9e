"""`defining_severity`: one of the ten levels, from the text and the earlier steps' results (a rubric in the template).

The rules are in `processor.pure.triage`, the call in `processor.kinds.triage`; this module
is the registration: the entry point `defining_severity = processor.kinds.defining_severity:make`.
"""

from __future__ import annotations

from typing import Any

from processor.kinds.triage import TriageKind, make_kind
from processor.pure.triage import TriageType

TYPE = TriageType.DEFINING_SEVERITY.value


def make(settings: Any) -> TriageKind:
    return make_kind(TriageType.DEFINING_SEVERITY, settings)
