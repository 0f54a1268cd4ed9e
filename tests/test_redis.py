"""Scale-out: replicas sharing quotas and leases through a real Redis.

Needs Redis at 127.0.0.1:6379 (started by this machine kind before sessions and CI); test 4
starts and stops a Redis of its own on another port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from zoneinfo import ZoneInfo

import coredis
import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.effects.redis_state import RedisLeases, RedisLimiter, RedisShared, RedisUnavailable
from processor.pure import ratelimit as rl
from processor.sandbox import serve_asgi
from processor.sandbox.fake_backends import FakeBackendState, FakeEmbeddings
from tests.conftest import all_done, sandbox_env, wait_until

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def fake_openai(nursery):
    state = FakeBackendState(base=0.005, per_input=0.0002)
    stop = trio.Event()
    url = await nursery.start(lambda task_status: serve_asgi(FakeEmbeddings(state), "127.0.0.1", 0, shutdown=stop, task_status=task_status))
    yield state, url
    stop.set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replicas:
    def __init__(self, sandbox, tmp_path, backend_url: str, n: int, redis_url: str = REDIS, **extra: str) -> None:
        self.prefix = f"test-{uuid.uuid4().hex[:8]}"
        self.ports = [free_port() for _ in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
        for i in range(n):
            env = {**base, **sandbox_env(sandbox, tmp_path / f"r{i}"), "PROCESSING_MODE": "openai", "OPENAI_API_KEY": "sk-test-0000000000000000",
                   "OPENAI_BASE_URL": backend_url, "STATE_BACKEND": "redis", "REDIS_URL": redis_url, "REDIS_KEY_PREFIX": self.prefix,
                   "STATE_DIR": str(tmp_path / f"r{i}"), "METRICS_PORT": str(self.ports[i]), "POLLING_INTERVAL_SECONDS": "0.5", **extra}
            log = open(tmp_path / f"r{i}.log", "wb")  # noqa: SIM115
            self.procs.append(subprocess.Popen([sys.executable, "-m", "processor", "run"], env=env, stdout=log, stderr=log))

    async def ready(self, i: int) -> tuple[int, dict]:
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.get(f"http://127.0.0.1:{self.ports[i]}/ready")
            return r.status_code, r.json()

    async def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        with trio.move_on_after(15):
            while any(p.poll() is None for p in self.procs):
                await trio.sleep(0.05)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        await cleanup(REDIS, self.prefix)


async def cleanup(url: str, prefix: str) -> None:
    client = coredis.Redis.from_url(url, decode_responses=True)
    async with client:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(keys)


def max_in_window(times: list[float], width: float = 60.0) -> int:
    times = sorted(times)
    best = j = 0
    for i, t in enumerate(times):
        while times[j] <= t - width:
            j += 1
        best = max(best, i - j + 1)
    return best


# 1 ----------------------------------------------------------------------------------------
async def test_three_replicas_drain_without_embedding_any_task_twice(sandbox, tmp_path, fake_openai):
    state, url = fake_openai
    sandbox.state.seed(2000, model="text-embedding-3-small")
    reps = Replicas(sandbox, tmp_path, url, 3)
    try:
        await wait_until(all_done(sandbox.state, 2000), timeout=180)
    finally:
        await reps.stop()
    assert sandbox.state.by_state() == {"succeeded": 2000}
    assert len(state.inputs) == 2000 and max(state.inputs.values()) == 1  # no task embedded twice
    assert sandbox.state.stats()["tasks_with_repeat_callbacks"] == 0


# 2 ----------------------------------------------------------------------------------------
async def test_a_global_per_minute_limit_is_shared_by_three_replicas(sandbox, tmp_path, fake_openai):
    _, url = fake_openai
    sandbox.state.seed(120, model="text-embedding-3-small")
    reps = Replicas(sandbox, tmp_path, url, 3, RATE_LIMIT_ENABLED="true", RATE_LIMIT_PER_MINUTE="30")
    try:
        await wait_until(lambda: sandbox.state.by_state().get("succeeded", 0) >= 30)
        # more only once the first claims have left the rolling minute
        await wait_until(lambda: sandbox.state.by_state().get("succeeded", 0) > 30)
    finally:
        await reps.stop()
    claims = [p.at for p in sandbox.state.patches if p.state == "in_progress"]
    # the other replicas did not add their own 30: never more than 30 claims in a minute
    # (however fast or slow the first 30 went), and the limit let work go on after it
    assert len(claims) > 30 and max_in_window(claims) <= 30


# 3 ----------------------------------------------------------------------------------------
async def test_a_killed_replicas_tasks_are_finished_by_the_others(sandbox, tmp_path, fake_openai):
    state, url = fake_openai
    state.base = 0.8  # slow batches: the kill lands mid-batch
    sandbox.state.seed(300, model="text-embedding-3-small")
    reps = Replicas(sandbox, tmp_path, url, 3, LEASE_TTL_SECONDS="2", MAX_BATCH_SIZE="16")
    try:
        await wait_until(lambda: sandbox.state.by_state().get("succeeded", 0) >= 40)
        reps.procs[0].kill()
        reps.procs[0].wait()
        stuck = sandbox.state.by_state().get("in_progress", 0)
        assert stuck > 0
        await wait_until(all_done(sandbox.state, 300), timeout=120)
    finally:
        await reps.stop()
    assert sandbox.state.by_state() == {"succeeded": 300}


# 4 ----------------------------------------------------------------------------------------
@pytest.fixture
def own_redis(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:  # pragma: no cover - this machine kind ships redis-server
        pytest.fail("redis-server is not installed")
    port = free_port()

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                                stdout=subprocess.DEVNULL)

    holder = {"proc": start()}
    yield port, holder, start
    if holder["proc"].poll() is None:
        holder["proc"].terminate()
        holder["proc"].wait()


async def test_redis_down_mid_run_fails_closed_and_resumes(sandbox, tmp_path, fake_openai, own_redis):
    port, holder, start = own_redis
    _, url = fake_openai
    sandbox.state.seed(600, model="text-embedding-3-small")
    redis_url = f"redis://127.0.0.1:{port}/0"
    reps = Replicas(sandbox, tmp_path, url, 2, redis_url=redis_url, LEASE_TTL_SECONDS="2", MAX_BATCH_SIZE="8", CONCURRENCY_LIMIT="1")
    try:
        await wait_until(lambda: sandbox.state.by_state().get("succeeded", 0) >= 50)
        holder["proc"].terminate()
        holder["proc"].wait()

        async def both_red() -> bool:
            for i in range(2):
                code, body = await reps.ready(i)
                if not (code == 503 and any("redis" in r for r in body["reasons"])):
                    return False
            return True

        with trio.fail_after(120):  # however long the replicas take to notice
            while not await both_red():
                await trio.sleep(0.2)
        await trio.sleep(3)  # a claim already past its lease may still land
        claims_before = sum(1 for p in sandbox.state.patches if p.state == "in_progress")
        await trio.sleep(3)
        assert sum(1 for p in sandbox.state.patches if p.state == "in_progress") == claims_before  # no claims
        for i in range(2):
            code, body = await reps.ready(i)
            assert code == 503 and any("redis" in r for r in body["reasons"]), body
        holder["proc"] = start()
        await wait_until(all_done(sandbox.state, 600), timeout=120)
        for i in range(2):
            with trio.fail_after(120):
                while (await reps.ready(i))[0] != 200:
                    await trio.sleep(0.2)
    finally:
        await reps.stop()
    assert sandbox.state.by_state() == {"succeeded": 600}


# 5 ----------------------------------------------------------------------------------------
ops = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(0, 8)),
        st.tuples(st.just("advance"), st.sampled_from([0.3, 1, 30, 59, 61, 3599, 3601, 86401, 7 * 86400, 31 * 86400])),
        st.tuples(st.just("back"), st.sampled_from([0.3, 1, 61, 3601, 86401])),  # Redis's clock steps back
        st.tuples(st.just("refund"), st.integers(0, 50), st.integers(1, 5)),
    ),
    max_size=30,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=ops,
    strategy=st.sampled_from(list(rl.Strategy)),
    zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"]),
    limits=st.fixed_dictionaries({}, optional={p: st.integers(1, 10) for p in rl.Period}).filter(bool),
)
async def test_the_redis_script_and_the_pure_core_agree(ops, strategy, zone, limits):
    client = coredis.Redis.from_url(REDIS, decode_responses=True)
    prefix = f"eq-{uuid.uuid4().hex[:8]}"
    async with client:
        shared = RedisShared(client, prefix=prefix)
        redis_limiter = RedisLimiter(shared, limits, strategy=strategy, tz_name=zone, metrics=None)
        pure = rl.new_state(limits, strategy=strategy, tz=ZoneInfo(zone))
        now = 1_790_000_000.25
        reservations: list[list[rl.Reservation]] = []
        try:
            for op in ops:
                if op[0] == "advance":
                    now += op[1]
                elif op[0] == "back":
                    now -= op[1]
                elif op[0] == "admit":
                    pure, expected = rl.admit(pure, now, op[1])
                    got = await redis_limiter.admit_at(op[1], now)
                    assert got.admitted == expected.admitted
                    assert got.retry_at == expected.retry_at
                    assert got.at == expected.at and got.reservations == expected.reservations
                    if got.admitted:
                        reservations.append([r for r in got.reservations if r is not None])
                elif reservations:
                    group = reservations[op[1] % len(reservations)]
                    back, group[:] = group[: op[2]], group[op[2] :]
                    pure, _ = rl.refund(pure, back)
                    await redis_limiter.refund(back)
                t = rl.effective_now(pure, now)
                assert rl.usage(redis_limiter.state, t) == rl.usage(pure, t)
        finally:
            await cleanup(REDIS, prefix)


budget_ops = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 3000), st.sampled_from(["a", "b", "x", None])), max_size=4)),
        st.tuples(st.just("advance"), st.sampled_from([0.3, 30, 61, 3601, 86401])),
        st.tuples(st.just("back"), st.sampled_from([1, 61, 3601])),
        st.tuples(st.just("settle"), st.integers(0, 50), st.integers(0, 4000), st.integers(0, 4000)),
        st.tuples(st.just("refund"), st.integers(0, 50)),
    ),
    max_size=25,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=budget_ops,
    strategy=st.sampled_from(list(rl.Strategy)),
    tasks=st.fixed_dictionaries({}, optional={rl.Period.MINUTE: st.integers(1, 6)}),
    tokens=st.fixed_dictionaries({}, optional={p: st.integers(1, 8000) for p in (rl.Period.MINUTE, rl.Period.DAY)}),
    spend=st.fixed_dictionaries({}, optional={p: st.integers(1, 60_000) for p in (rl.Period.DAY, rl.Period.MONTH)}),
)
async def test_the_redis_script_and_the_pure_core_agree_on_budgets(ops, strategy, tasks, tokens, spend):
    from processor.pure.budget import ModelPrice

    prices = {"a": ModelPrice(2_000_000, 8_000_000), "b": ModelPrice(20_000)}
    if not (tasks or tokens or spend):
        tasks = {rl.Period.MINUTE: 6}  # with no tier at all the daemon uses no limiter
    client = coredis.Redis.from_url(REDIS, decode_responses=True)
    prefix = f"eqb-{uuid.uuid4().hex[:8]}"
    async with client:
        lim = RedisLimiter(RedisShared(client, prefix=prefix), tasks, strategy=strategy, tz_name="Europe/Berlin", metrics=None,
                           tokens=tokens, spend=spend, prices=prices)
        pure = rl.new_state(tasks, strategy=strategy, tz=ZoneInfo("Europe/Berlin"), tokens=tokens, spend=spend, prices=prices)
        now = 1_790_000_000.25
        held: list[rl.Reservation] = []
        try:
            for op in ops:
                if op[0] == "advance":
                    now += op[1]
                elif op[0] == "back":
                    now -= op[1]
                elif op[0] == "admit":
                    demands = [rl.Demand(*d) for d in op[1]]
                    pure, expected = rl.admit(pure, now, demands)
                    got = await lim.admit_at(demands, now)
                    assert got == expected
                    held += [r for r in got.reservations if r is not None]
                elif held and op[0] == "settle":
                    r = held.pop(op[1] % len(held))
                    pure, _, want = rl.settle(pure, [r], op[2], op[3])
                    assert await lim.settle([r], tokens_in=op[2], tokens_out=op[3]) == want
                elif held:
                    r = held.pop(op[1] % len(held))
                    pure, _ = rl.refund(pure, [r])
                    await lim.refund([r])
                t = rl.effective_now(pure, now)
                assert rl.usage(lim.state, t) == rl.usage(pure, t)
        finally:
            await cleanup(REDIS, prefix)


async def test_redis_time_stepping_back_across_a_period_edge_reopens_nothing():
    """Fixed minute windows at 10/min: Redis's clock steps back across the edge. Another
    replica (a second limiter on the same keys) sees the same shared high-water mark."""
    client = coredis.Redis.from_url(REDIS, decode_responses=True)
    prefix = f"hw-{uuid.uuid4().hex[:8]}"
    edge = 1_790_000_040.0  # a minute edge
    async with client:
        a, b = (RedisLimiter(RedisShared(client, prefix=prefix), {rl.Period.MINUTE: 10}, strategy=rl.Strategy.FIXED,
                             tz_name="UTC", metrics=None) for _ in range(2))
        try:
            assert (await a.admit_at(10, edge - 0.5)).admitted == 10
            assert (await a.admit_at(10, edge + 0.2)).admitted == 10
            d = await b.admit_at(10, edge - 0.4)  # the other replica, after the step back
            assert d.admitted == 0 and d.at == edge + 0.2 and d.retry_at == edge + 60
            assert (await a.admit_at(10, edge + 60)).admitted == 10
        finally:
            await cleanup(REDIS, prefix)


async def test_a_redis_refund_goes_back_to_the_bucket_it_was_charged_to():
    client = coredis.Redis.from_url(REDIS, decode_responses=True)
    prefix = f"rf-{uuid.uuid4().hex[:8]}"
    edge = 1_790_000_040.0
    async with client:
        lim = RedisLimiter(RedisShared(client, prefix=prefix), {rl.Period.MINUTE: 10, rl.Period.HOUR: 100},
                           strategy=rl.Strategy.FIXED, tz_name="UTC", metrics=None)
        try:
            first = await lim.admit_at(10, edge - 0.01)
            assert (await lim.admit_at(10, edge + 0.01)).admitted == 10
            await lim.refund(first.reservations[:5])
            assert (await lim.admit_at(1, edge + 0.02)).admitted == 0  # the minute from the edge stays full
            await lim.refresh()
            assert [(u.period, u.used) for u in rl.usage(lim.state, edge + 0.02)] == [(rl.Period.MINUTE, 10), (rl.Period.HOUR, 15)]
        finally:
            await cleanup(REDIS, prefix)


async def test_an_unreachable_redis_is_a_limiter_error_never_a_coredis_one():
    from processor.effects.limiter import LimiterError
    from processor.pure.faults import Dependency, Fault

    client = coredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", decode_responses=True, connect_timeout=0.5)
    async with client:
        lim = RedisLimiter(RedisShared(client, prefix="nowhere"), {rl.Period.MINUTE: 10}, strategy=rl.Strategy.ROLLING,
                           tz_name="UTC", metrics=None)
        for call in (lambda: lim.admit(1), lambda: lim.refund([lim.reservation_at(1_790_000_000.0)]), lim.refresh):
            with pytest.raises(LimiterError) as info:
                await call()
            assert info.value.kind is Fault.UNREACHABLE and info.value.dependency is Dependency.REDIS


async def test_leases_are_exclusive_renewed_and_marked_done():
    client = coredis.Redis.from_url(REDIS, decode_responses=True)
    prefix = f"ls-{uuid.uuid4().hex[:8]}"
    async with client:
        shared = RedisShared(client, prefix=prefix)
        a = RedisLeases(shared, ttl=3.0, owner="a")
        b = RedisLeases(shared, ttl=3.0, owner="b")
        try:
            assert await a.acquire(["t1", "t2"]) == ["t1", "t2"]
            assert await b.acquire(["t1", "t2", "t3"]) == ["t3"]
            assert await b.live(["t1", "t3", "t9"]) == {"t1", "t3"}
            await a.complete(["t1"])  # reported: a 'done' marker keeps stale pollers off
            assert await b.acquire(["t1"]) == []
            await a.release(["t2"])  # handed back: free for anyone
            assert await b.acquire(["t2"]) == ["t2"]
            async with trio.open_nursery() as n:  # b renews; a's marker expires
                n.start_soon(b.renew_forever)
                with trio.fail_after(60):
                    while await a.acquire(["t1"]) != ["t1"]:  # free once the marker's TTL is over
                        await trio.sleep(0.1)
                assert await a.acquire(["t2", "t3"]) == []  # b's, renewed past their TTL
                n.cancel_scope.cancel()
            await client.delete([f"{prefix}:lease:t2"])  # someone else's decision: b lost it
            await b._shared.call("acquire", [f"{prefix}:lease:t2"], ["intruder", 50000])
            async with trio.open_nursery() as n:
                n.start_soon(b.renew_forever)
                with trio.fail_after(60):  # noticed at the next renewal
                    while not b.lost():
                        await trio.sleep(0.05)
                n.cancel_scope.cancel()
            assert b.lost() == {"t2"}
        finally:
            await cleanup(REDIS, prefix)


async def test_limits_command_reads_the_shared_counters(tmp_path):
    prefix = f"lim-{uuid.uuid4().hex[:8]}"
    client = coredis.Redis.from_url(REDIS, decode_responses=True)
    async with client:
        limiter = RedisLimiter(RedisShared(client, prefix=prefix), {rl.Period.MINUTE: 20, rl.Period.DAY: 500},
                               strategy=rl.Strategy.ROLLING, tz_name="UTC", metrics=None)
        assert (await limiter.admit(7)).admitted == 7
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    env.update({"API_BASE_URL": "http://127.0.0.1:9", "OAUTH2_TOKEN_URL": "http://127.0.0.1:9/t", "OAUTH2_CLIENT_ID": "a",
                "OAUTH2_CLIENT_SECRET": "b", "PROCESSING_MODE": "mock", "STATE_DIR": str(tmp_path), "STATE_BACKEND": "redis",
                "REDIS_URL": REDIS, "REDIS_KEY_PREFIX": prefix, "RATE_LIMIT_PER_MINUTE": "20", "RATE_LIMIT_PER_DAY": "500"})
    try:
        r = subprocess.run([sys.executable, "-m", "processor", "limits"], env=env, capture_output=True, text=True, timeout=60)
    finally:
        await cleanup(REDIS, prefix)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split()[1:4] for line in r.stdout.splitlines()[2:]}
    assert rows["minute"] == ["7", "20", "13"] and rows["day"] == ["7", "500", "493"]


async def test_readiness_returns_with_redis_even_without_work(own_redis):
    port, holder, start = own_redis
    client = coredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", decode_responses=True)
    async with client:
        shared = RedisShared(client, prefix="watch")
        holder["proc"].terminate()
        holder["proc"].wait()
        with pytest.raises(RedisUnavailable):
            await shared.now()
        assert shared.unavailable
        async with trio.open_nursery() as n:
            n.start_soon(shared.watch)
            holder["proc"] = start()
            with trio.fail_after(120):
                while shared.unavailable:
                    await trio.sleep(0.1)
            n.cancel_scope.cancel()
