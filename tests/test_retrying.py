"""The one retry primitive: bounds, budget, pacing, hooks, the testing switch."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from processor.effects import retrying as rt


class Flaky(Exception):
    pass


async def run(fails: int, **kw: object) -> tuple[int, float]:
    calls = 0
    start = trio.current_time()
    async for attempt in rt.retrying(name="t", on=lambda e: isinstance(e, Flaky), **kw):  # type: ignore[arg-type]
        with attempt:
            calls += 1
            if calls <= fails:
                raise Flaky(calls)
    return calls, trio.current_time() - start


async def test_succeeds_after_failures(autojump_clock: trio.testing.MockClock) -> None:
    calls, waited = await run(2, attempts=5, base=1.0)
    assert calls == 3 and 0 <= waited <= 1.0 + 2.0


async def test_gives_up_after_attempts_with_the_last_error(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(Flaky, match="3"):
        await run(10, attempts=3)


async def test_other_errors_pass_at_once(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(KeyError):
        async for attempt in rt.retrying(name="t", on=lambda e: isinstance(e, Flaky), attempts=5):
            with attempt:
                raise KeyError("x")


async def test_deadline_bounds_the_whole_operation(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    with pytest.raises(Flaky):
        await run(100, attempts=100, base=1.0, factor=1.0, cap=1.0, timeout=5.0)
    assert trio.current_time() - start <= 5.0


async def test_server_asked_delay_is_used_and_spends_no_budget(autojump_clock: trio.testing.MockClock) -> None:
    budget = rt.Budget(reserve=0.0, ratio=0.0)
    calls = 0
    start = trio.current_time()
    async for attempt in rt.retrying(name="t", on=lambda e: 7.0, attempts=3, budget=budget):
        with attempt:
            calls += 1
            if calls < 3:
                raise Flaky()
    assert calls == 3 and trio.current_time() - start == pytest.approx(14.0)


async def test_budget_refills_with_attempts(autojump_clock: trio.testing.MockClock) -> None:
    """Regression (issue 11): backend budgets only spent and never refilled."""
    budget = rt.Budget(ratio=0.5, reserve=1.0, cap=5.0)
    # many operations that each need one retry: the deposits keep the budget alive
    for _ in range(50):
        calls, _ = await run(1, attempts=3, budget=budget)
        assert calls == 2
    empty = rt.Budget(ratio=0.0, reserve=0.0)
    with pytest.raises(Flaky):
        await run(1, attempts=3, budget=empty)


async def test_hooks_see_every_retry_and_testing_switch_turns_waits_off(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[tuple[str, int]] = []

    def hook(name: str, n: int, delay: float, exc: BaseException) -> None:
        seen.append((name, n))

    rt.add_hook(hook)
    rt.set_testing(True)
    try:
        calls, waited = await run(3, attempts=5, base=30.0, cap=30.0)
    finally:
        rt.set_testing(False)
        rt.remove_hook(hook)
    assert calls == 4 and seen == [("t", 1), ("t", 2), ("t", 3)]
    assert waited == 0.0  # no back-off slept, even on the virtual clock
