"""Hypothesis settings for the whole-daemon properties (each example is a daemon run of a
few seconds): a bounded count in CI, many more with HYPOTHESIS_PROFILE=nightly. The
settings objects are applied per test (`@PROFILE`), so other tests' settings are untouched.
HOSTILE_EXAMPLES overrides the count of either; HOSTILE_SHRINK=0 reports a failing example
as drawn (no shrinking: each shrink step is a daemon run of its own)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

_COMMON: dict = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
if os.environ.get("HOSTILE_SHRINK") == "0":
    _COMMON["phases"] = [p for p in Phase if p is not Phase.shrink]
# CI draws the same examples every run (a red CI blocks landing: it must mean a defect, not
# a new draw); the nightly profile explores.
CI = settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "4")), derandomize=True, **_COMMON)
NIGHTLY = settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "150")), **_COMMON)
settings.register_profile("hostile-ci", CI)
settings.register_profile("nightly", NIGHTLY)
PROFILE = NIGHTLY if os.environ.get("HYPOTHESIS_PROFILE") == "nightly" else CI
