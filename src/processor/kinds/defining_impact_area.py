"""`defining_impact_area`: one area from `content.options` or the platform's 13, offered as an enum.

The rules are in `processor.pure.triage`, the call in `processor.kinds.triage`; this module
is the registration: the entry point `defining_impact_area = processor.kinds.defining_impact_area:make`.
"""

from __future__ import annotations

from typing import Any

from processor.kinds.triage import TriageKind, make_kind
from processor.pure.triage import TriageType

TYPE = TriageType.DEFINING_IMPACT_AREA.value


def make(settings: Any) -> TriageKind:
    return make_kind(TriageType.DEFINING_IMPACT_AREA, settings)
