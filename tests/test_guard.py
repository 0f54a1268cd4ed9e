"""The guard's claim slot: an open backend gets no claims; a recovering one gets one group."""

from __future__ import annotations

import trio
import trio.testing

from processor.effects import guard as g
from processor.pure import breaker as br


def _guard() -> g.Guard:
    return g.Guard("b", br.BreakerConfig(threshold=1, base_wait=5.0, max_wait=5.0))


async def test_closed_always_claims(autojump_clock: trio.testing.MockClock) -> None:
    guard = _guard()
    assert all(guard.claim_slot() for _ in range(10))


async def test_open_claims_nothing_then_one_probe_group(autojump_clock: trio.testing.MockClock) -> None:
    guard = _guard()
    guard.force_open()
    assert not guard.claim_slot()
    await trio.sleep(5.1)
    assert guard.claim_slot()  # the probe's group
    assert not guard.claim_slot() and not guard.claim_slot()  # nothing more while it is on its way
    assert guard.allow()  # the probe goes
    guard.record(br.Outcome.SUCCESS)
    assert guard.claim_slot() and guard.claim_slot()  # closed again


async def test_a_probe_group_that_never_came_frees_the_slot_later(autojump_clock: trio.testing.MockClock) -> None:
    guard = _guard()
    guard.force_open()
    await trio.sleep(5.1)
    assert guard.claim_slot()
    await trio.sleep(g.PROBE_CLAIM_HOLD + 0.1)
    assert guard.claim_slot()


async def test_a_failed_probe_reopens_and_the_wait_starts_again(autojump_clock: trio.testing.MockClock) -> None:
    guard = _guard()
    guard.force_open()
    await trio.sleep(5.1)
    assert guard.claim_slot() and guard.allow()
    guard.record(br.Outcome.FAILURE)
    assert not guard.claim_slot()
