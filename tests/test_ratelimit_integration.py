"""RATE_LIMIT_PER_MINUTE=20 against the sandbox, on a virtual clock running 5x faster (faster would stretch claim latency past the limiter's 1 s slack).

Claims are read from the sandbox's own PATCH log (its clock is the same virtual clock):
no sliding 60 s window holds more than 20 claims, the first minute holds exactly 20, and a
restart mid-window does not reset the count.
"""

from __future__ import annotations

import trio

from processor.daemon import Daemon
from processor.pure.tasks import Backend
from tests.conftest import CountingBackend, make_settings, running

EPOCH = 1_780_000_000.0


def claim_times(sandbox) -> list[float]:
    return sorted(p.at for p in sandbox.state.patches if p.state == "in_progress")


def max_in_any_window(times: list[float], width: float = 60.0) -> int:
    best = 0
    j = 0
    for i, t in enumerate(times):
        while times[j] <= t - width:
            j += 1
        best = max(best, i - j + 1)
    return best


def virtual(sandbox) -> None:
    sandbox.state.clock = lambda: EPOCH + trio.current_time()


async def test_per_minute_limit_holds_in_every_sliding_window(sandbox, tmp_path, mock_clock):
    mock_clock.rate = 5
    virtual(sandbox)
    sandbox.state.seed(70)
    settings = make_settings(sandbox, tmp_path, RATE_LIMIT_ENABLED="true", RATE_LIMIT_PER_MINUTE="20", POLLING_INTERVAL_SECONDS="5")
    daemon = Daemon(settings, backends={Backend.MOCK: CountingBackend()}, clock=lambda: EPOCH + trio.current_time())
    async with running(daemon):
        await trio.sleep(75)  # virtual seconds: 15 real seconds
    times = claim_times(sandbox)
    assert max_in_any_window(times) <= 20
    first = times[0]
    assert sum(1 for t in times if t < first + 60) == 20  # the first minute uses its whole budget
    assert 21 <= len(times) <= 40  # the second minute started
    states = sandbox.state.by_state()
    assert states.get("in_progress", 0) == 0 and states.get("failed", 0) == 0


async def test_a_restart_mid_window_does_not_reset_the_count(sandbox, tmp_path, mock_clock):
    mock_clock.rate = 5
    virtual(sandbox)
    sandbox.state.seed(60)
    settings = make_settings(sandbox, tmp_path, RATE_LIMIT_ENABLED="true", RATE_LIMIT_PER_MINUTE="20", POLLING_INTERVAL_SECONDS="5")
    clock = lambda: EPOCH + trio.current_time()  # noqa: E731
    first = Daemon(settings, backends={Backend.MOCK: CountingBackend()}, clock=clock)
    async with running(first):
        await trio.sleep(20)
    assert len(claim_times(sandbox)) == 20
    second = Daemon(settings, backends={Backend.MOCK: CountingBackend()}, clock=clock)
    async with running(second):
        await trio.sleep(30)  # still inside the first minute: nothing may be claimed
        assert len(claim_times(sandbox)) == 20
        await trio.sleep(40)
    times = claim_times(sandbox)
    assert len(times) > 20 and max_in_any_window(times) <= 20
