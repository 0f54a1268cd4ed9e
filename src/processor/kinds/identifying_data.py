"""`identifying_data`: the people a claim names, each with its Wikidata item when one is a human (P31 = Q5).

The rules are in `processor.pure.triage`, the call in `processor.kinds.triage`; this module
is the registration: the entry point `identifying_data = processor.kinds.identifying_data:make`.
"""

from __future__ import annotations

from typing import Any

from processor.kinds.triage import TriageKind, make_kind
from processor.pure.triage import TriageType

TYPE = TriageType.IDENTIFYING_DATA.value


def make(settings: Any) -> TriageKind:
    return make_kind(TriageType.IDENTIFYING_DATA, settings)
