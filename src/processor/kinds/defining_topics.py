"""`defining_topics`: one to five topics of a claim (a non-empty list), with Wikidata ids when found.

The rules are in `processor.pure.triage`, the call in `processor.kinds.triage`; this module
is the registration: the entry point `defining_topics = processor.kinds.defining_topics:make`.
"""

from __future__ import annotations

from typing import Any

from processor.kinds.triage import TriageKind, make_kind
from processor.pure.triage import TriageType

TYPE = TriageType.DEFINING_TOPICS.value


def make(settings: Any) -> TriageKind:
    return make_kind(TriageType.DEFINING_TOPICS, settings)
