"""Task leases (`RedisLeases`) over a fake of Redis's lease scripts, under the autojump clock:
what a renewal that crosses a report, a release or a new acquisition may conclude."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from processor.effects.redis_state import RedisLeases


class FakeRedis:
    """The five lease scripts' semantics (no expiry: these tests never wait a TTL out).
    `before` runs (once) while the next renewal is on its way to Redis, `after` while its
    answer is on its way back: what other requests of this replica may do meanwhile."""

    prefix = "t"
    unavailable = None

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.before: Callable[[], Awaitable[None]] | None = None
        self.after: Callable[[], Awaitable[None]] | None = None
        self.renewals = 0

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        await trio.lowlevel.checkpoint()
        owner = str(args[0]) if args else ""
        if name == "acquire":
            out = []
            for k in keys:
                out.append(0 if k in self.keys else 1)
                self.keys.setdefault(k, owner)
            return out
        if name == "renew":
            before, after, self.before, self.after = self.before, self.after, None, None
            if before is not None:
                await before()
            out = [1 if self.keys.get(k) == owner else 0 for k in keys]
            if after is not None:
                await after()
            self.renewals += 1
            return out
        if name in ("release", "complete"):
            for k in keys:
                if self.keys.get(k) == owner:
                    if name == "release":
                        del self.keys[k]
                    else:
                        self.keys[k] = f"done:{owner}"
            return len(keys)
        if name == "live":
            return [1 if k in self.keys else 0 for k in keys]
        raise AssertionError(name)


async def _one_renewal(redis: FakeRedis, leases: RedisLeases) -> None:
    async with trio.open_nursery() as n:
        n.start_soon(leases.renew_forever)
        while redis.renewals == 0:
            await trio.sleep(1.0)
        n.cancel_scope.cancel()


async def test_a_lease_reported_while_its_renewal_was_on_its_way_is_not_lost(autojump_clock) -> None:
    redis = FakeRedis()
    leases = RedisLeases(redis, ttl=30.0, owner="a")  # type: ignore[arg-type]
    assert await leases.acquire(["t1", "t2"]) == ["t1", "t2"]
    redis.keys["t:lease:t2"] = "intruder"  # taken over for real (expired, then taken)

    async def report() -> None:
        await leases.complete(["t1"])  # t1's key is now a done marker: "not ours" to the renewal

    redis.before = report
    await _one_renewal(redis, leases)
    assert leases.lost() == {"t2"}  # t1 was let go of, not lost
    assert set(leases.owned) == set()


async def test_a_lease_released_and_taken_again_meanwhile_is_still_held(autojump_clock) -> None:
    redis = FakeRedis()
    leases = RedisLeases(redis, ttl=30.0, owner="a")  # type: ignore[arg-type]
    assert await leases.acquire(["t1"]) == ["t1"]

    async def release() -> None:
        await leases.release(["t1"])

    async def take_again() -> None:
        assert await leases.acquire(["t1"]) == ["t1"]  # a new acquisition, after Redis answered

    redis.before, redis.after = release, take_again
    await _one_renewal(redis, leases)
    assert leases.lost() == set() and set(leases.owned) == {"t1"}


async def test_a_lost_lease_taken_again_is_no_longer_lost(autojump_clock) -> None:
    redis = FakeRedis()
    leases = RedisLeases(redis, ttl=30.0, owner="a")  # type: ignore[arg-type]
    assert await leases.acquire(["t1"]) == ["t1"]
    redis.keys["t:lease:t1"] = "someone"
    await _one_renewal(redis, leases)
    assert leases.lost() == {"t1"}
    del redis.keys["t:lease:t1"]  # the other replica handed it back
    assert await leases.acquire(["t1"]) == ["t1"]
    assert leases.lost() == set()  # its next result is reported, not abandoned


async def test_held_and_lost_stay_bounded_over_many_tasks(autojump_clock) -> None:
    """Many tasks, each taken, one in ten lost, the others reported or released while a
    renewal is on its way; the book lets go of each (a lost one too: LEASE_LOST releases):
    nothing is kept, nothing reported is taken for lost."""
    redis = FakeRedis()
    leases = RedisLeases(redis, ttl=30.0, owner="a")  # type: ignore[arg-type]
    for n in range(200):
        ids = [f"{n}-{i}" for i in range(10)]
        assert await leases.acquire(ids) == ids
        redis.keys[f"t:lease:{ids[0]}"] = "someone"

        async def settle(ids: list[str] = ids) -> None:
            await leases.complete(ids[1:6])
            await leases.release(ids[6:])

        redis.before = settle
        redis.renewals = 0
        await _one_renewal(redis, leases)
        assert leases.lost() == {ids[0]}
        await leases.release([ids[0]])  # what the book does when it abandons the task
        assert len(leases.owned) == 0 and len(leases.lost()) == 0
