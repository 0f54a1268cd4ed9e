"""Hypothesis settings for the whole-daemon properties (each example is a daemon run of a
few seconds): a bounded count in CI, many more with HYPOTHESIS_PROFILE=nightly. The
settings objects are applied per test (`@PROFILE`), so other tests' settings are untouched."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.hostile.harness import hostile_world

_COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=False, print_blob=True)
CI = settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "4")), **_COMMON)  # type: ignore[arg-type]
NIGHTLY = settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "150")), **_COMMON)  # type: ignore[arg-type]
# shrinking a whole-daemon example costs a daemon run per step: bounded by the phases' own limits
settings.register_profile("hostile-ci", CI)
settings.register_profile("nightly", NIGHTLY)
PROFILE = NIGHTLY if os.environ.get("HYPOTHESIS_PROFILE") == "nightly" else CI
NO_SHRINK = settings(phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target])


@pytest.fixture
async def world(tmp_path):
    async with hostile_world(tmp_path) as w:
        yield w
