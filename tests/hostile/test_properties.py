"""Properties over whole daemon runs (issue 11): each example is a world drawn by
Hypothesis, a real daemon process living in it for a few seconds, then the world calms down
and, once quiet, every property of `World.violations` must hold:

- the daemon never exits on its own (a SIGTERM the plan sends ends it with exit 0);
- every task offered ends `succeeded` (a valid one, with its text's vector), `failed` with
  a reason naming its own defect, or `pending`; none `in_progress` once quiet;
- no task reported `succeeded` twice with different results;
- no computed result lost (a vector the backend served for a valid task ends reported);
- no configured limit exceeded in any window (RATE_LIMIT_PER_MINUTE, counted from outside:
  claims whose text reached the backend);
- no secret (client secret, API key, any access token issued) in the logs, /health, /ready
  or /metrics.

A world is a `Plan`: the pending entries (any JSON in any field, duplicates, huge integers,
floats, surrogates, deep nesting, non-objects), faults at every step of the task API and the
token endpoint (statuses, resets, hangs, applied-then-failed), the pending body's shape
(non-list, truncated, HTML, dripping), token answers, the backend's answers (5xx, 429, HTML,
null, wrong counts and dims, NaN, wrong types, resets, hangs, parameter 400s), an optional
rate limit and an optional restart (SIGTERM or SIGKILL) in the middle of it.

Four kinds of deployment live in such worlds: `ollama`, `openai`, `hybrid` (each valid task
names the local or the OpenAI model, drawn per entry; a model neither serves is answered 404
by the OpenAI side) and `replicas` (two Ollama-mode daemons sharing the limit and the leases
through the real Redis at 127.0.0.1:6379, under a key prefix of their own; a restart stops
one of them and starts it again while the other goes on).

CI draws the same few examples every run (`profiles.CI`, derandomized); `HYPOTHESIS_PROFILE=
nightly` explores (150 examples each), `HOSTILE_EXAMPLES=N` sets the count. The daemon runs as
its own process (`HOSTILE_DAEMON_SRC=<tree>/src` runs another tree's); nothing here asserts a
wall time: waits poll a condition, with generous bounds for a busy machine.
"""

from __future__ import annotations

import copy
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import coredis
import trio
from hypothesis import given
from hypothesis import strategies as st

from processor.sandbox.app import Fault, PendingShape, SandboxState, TokenAnswer
from processor.sandbox.fake_backends import Answer, FakeBackendState, param_error
from processor.sandbox.harness import LOCAL_MODEL, OLLAMA_DIM, OPENAI_DIM, REMOTE_MODEL, Daemon, World, hostile_world

from .profiles import PROFILE
from .strategies import BACKEND_ANSWERS, PENDING_SHAPES, ROUTE_FAULTS, TOKEN_ANSWERS, EntrySpec, hostile_entries, offer

REDIS = "redis://127.0.0.1:6379/0"  # replicas: started by this machine kind before sessions and CI
QUIET_TIMEOUT = 120.0  # generous: a busy CI machine; the wait ends as soon as the world is quiet


@attrs.frozen
class Refusal:
    """The platform's callback refuses `count` results (each with `probability`): the API
    saves `succeeded`, then answers 400 (CONTRACT.md section 1)."""

    probability: float
    count: int


REFUSALS = st.none() | st.builds(Refusal, probability=st.floats(0.3, 1.0), count=st.integers(1, 3))


@attrs.frozen
class Plan:
    """One hostile world and what happens in it (shrunk examples print as this)."""

    mode: str
    entries: tuple[EntrySpec, ...]
    route_faults: dict[str, Fault]
    pending_shape: PendingShape | None
    token_answer: TokenAnswer | None
    backend_answers: tuple[Answer, ...]
    refusal: Refusal | None  # the callback refuses some results while the world is hostile
    hostile_for: float  # seconds of hostility after the daemon is up, then calm
    limit: int | None  # RATE_LIMIT_PER_MINUTE (None: no limit)
    batch: int  # MAX_BATCH_SIZE
    restart: str | None  # "term" | "kill": the daemon (replicas: the first) is stopped that way mid-run and started again
    remote: tuple[bool, ...] = ()  # hybrid: which entries name the OpenAI model (the others the local one)


def backend_answers(mode: str) -> st.SearchStrategy[tuple[Answer, ...]]:
    extra = st.builds(Answer, kind=st.just("hang"), latency=st.sampled_from([0.5, 2.0]), probability=st.floats(0.2, 0.6),
                      count=st.integers(1, 2))
    if mode == "openai":  # a server that refuses `dimensions` for a while (a proxy switched models, then back)
        extra = extra | st.builds(Answer, kind=st.just("status"), status=st.just(400), body=st.just(param_error(OPENAI_DIM, 384)),
                                  probability=st.floats(0.3, 1.0), count=st.integers(1, 3))
    return st.tuples(BACKEND_ANSWERS, st.lists(extra, max_size=1)).map(lambda t: tuple(t[0] + t[1]))




@st.composite
def plans(draw: st.DrawFn, mode: str) -> Plan:
    entries = tuple(draw(st.lists(hostile_entries(), min_size=1, max_size=12)))
    n = len(entries) if mode == "hybrid" else 0
    return Plan(
        mode=mode,
        entries=entries,
        route_faults=draw(ROUTE_FAULTS),
        pending_shape=draw(PENDING_SHAPES),
        token_answer=draw(TOKEN_ANSWERS),
        backend_answers=draw(backend_answers(mode)),
        refusal=draw(REFUSALS),
        hostile_for=draw(st.sampled_from([1.5, 3.0])),
        limit=draw(st.none() | st.integers(2, 8)),
        batch=draw(st.sampled_from([64, 4, 1])),
        restart=draw(st.sampled_from([None, "term", "kill"])),
        remote=tuple(draw(st.lists(st.booleans(), min_size=n, max_size=n))),
    )


@attrs.define
class Run:
    """One example: the world, its plan, and what the world did that the checks need."""

    world: World
    plan: Plan
    prefix: str = attrs.field(factory=lambda: f"hostile-{uuid.uuid4().hex[:10]}")  # replicas: their Redis keys
    refused: set[str] = attrs.field(factory=set)  # tasks whose succeeded report the callback refused
    problems: list[str] = attrs.field(factory=list)  # what went wrong on the way (a SIGTERM's exit code)

    def arrange(self) -> None:
        """Make the world hostile per the plan (copies: the plan itself stays as drawn)."""
        plan, world = self.plan, self.world
        for i, spec in enumerate(plan.entries):
            if plan.mode == "openai":
                offer(world, spec, i, model=REMOTE_MODEL)
            elif plan.mode == "hybrid":
                offer(world, spec, i, model=REMOTE_MODEL if plan.remote[i] else LOCAL_MODEL, default=LOCAL_MODEL)
            else:
                offer(world, spec, i)
        world.sandbox.faults.update(copy.deepcopy(plan.route_faults))
        world.sandbox.pending_shape = copy.deepcopy(plan.pending_shape)
        world.sandbox.token_answer = copy.deepcopy(plan.token_answer)
        world.fake.answers = list(copy.deepcopy(plan.backend_answers))
        if plan.refusal is not None:
            left = [plan.refusal.count]
            probability = plan.refusal.probability

            def on_result(state: SandboxState, task: dict[str, Any], result: Any) -> str | None:
                if left[0] <= 0 or state.rng.random() >= probability:
                    return None
                left[0] -= 1
                self.refused.add(str(task.get("_id")))
                return "the vector does not fit the target field"

            world.sandbox.on_result = on_result

    def calm(self) -> None:
        self.world.calm()
        self.world.sandbox.on_result = None

    def env(self, replica: int) -> dict[str, Any]:
        env: dict[str, Any] = {"MAX_BATCH_SIZE": self.plan.batch}
        if self.plan.limit is not None:
            env.update(RATE_LIMIT_ENABLED="true", RATE_LIMIT_PER_MINUTE=self.plan.limit)
        if self.plan.mode == "replicas":
            env.update(STATE_BACKEND="redis", REDIS_URL=REDIS, REDIS_KEY_PREFIX=self.prefix, STATE_DIR=self.world.tmp / f"state-r{replica}")
        return env

    async def start(self, replica: int) -> Daemon:
        mode = "ollama" if self.plan.mode == "replicas" else self.plan.mode
        return await self.world.start(mode, **self.env(replica))

    async def live(self) -> list[Daemon]:
        """The daemons through the plan, then the world calms down; returns the ones running."""
        plan = self.plan
        ds = [await self.start(k) for k in range(2 if plan.mode == "replicas" else 1)]
        if plan.restart is None:
            await trio.sleep(plan.hostile_for)
        else:
            await trio.sleep(plan.hostile_for / 2)
            d = ds[0]
            if plan.restart == "term":
                d.signal(signal.SIGTERM)
                code = await d.wait_exit(60)  # the grace is 5 s; a busy machine may take longer to get there
                if code != 0:
                    self.problems.append(f"SIGTERM ended the daemon with {code} (expected 0)\n{d.tail(3000)}")
                    if code is None:
                        d.kill()
            else:
                d.kill()
            ds[0] = await self.start(0)
            await trio.sleep(plan.hostile_for / 2)
        self.calm()
        return ds

    def quiet(self) -> Callable[[], bool] | None:
        """With a limit, valid tasks may wait for quota: quiet then also means all of them
        succeeded or the limit's units are spent."""
        limit = self.plan.limit
        if limit is None:
            return None
        valid = [o for o in self.world.offered if o.expect == "succeed"]
        return lambda: all(self.world.state_of(o.key) == "succeeded" for o in valid) or len(self.world.units()) >= limit

    def refusals(self) -> list[str]:
        """A refused result is the platform's word on it: `failed` with why (or a later
        `succeeded`), never pending or in_progress; the other checks leave these tasks out."""
        out = []
        for o in self.world.offered:
            if o.key in self.refused:
                o.expect = "refused"
                state, reason = self.world.state_of(o.key), self.world.sandbox.reasons.get(o.key) or ""
                if not (state == "succeeded" or (state == "failed" and "refused" in reason)):
                    out.append(f"task {o.key} ({o.note}): its result was refused, it ended {state} ({reason!r})")
        return out

    def lost(self) -> list[str]:
        """A valid task whose text the backend answered with a good vector must end succeeded."""
        served, w = self.world.fake.served, self.world
        return [f"valid task {o.key} ({o.note}): its vector was computed, the task ended {w.state_of(o.key)}"
                for o in w.offered if o.expect in ("succeed", "stay") and o.text is not None and served.get(o.text)
                and w.state_of(o.key) != "succeeded" and o.note.startswith("valid")]

    async def violations(self) -> list[str]:
        """Run the plan, wait for quiet, and return every property that does not hold."""
        plan, world = self.plan, self.world
        running = await self.live()
        d = running[-1]
        await world.wait_quiet(QUIET_TIMEOUT, also=self.quiet(), require_success=plan.limit is None)
        v = self.problems + self.refusals()
        if plan.limit is not None:
            for o in world.offered:  # valid tasks may wait for quota; every other property holds
                if o.expect == "succeed" and world.state_of(o.key) == "pending":
                    o.expect = "stay"
        v += await world.violations(d, openai=plan.mode == "openai", limit=("minute", plan.limit, 60.0) if plan.limit is not None else None)
        if plan.restart != "kill":  # a SIGKILL between the backend's answer and the outbox write loses it, by design
            v += self.lost()
        for other in world.daemons:
            if other is d:
                continue
            if other in running and not other.alive():
                v.append(f"(replica) exited on its own (exit {other.proc.poll()}); log tail:\n{other.tail(3000)}")
            v += [f"({'replica' if other in running else 'stopped daemon'}) {x}" for x in await world.leaks(other)]
        if v:
            v.append(f"--- sandbox: {world.sandbox.stats()}\n--- backend: {world.fake.stats()}\n--- logs: {world.tmp}")
        return v


async def run_plan(plan: Plan, tmp: Path) -> list[str]:
    fake = None
    if plan.mode == "openai":
        fake = FakeBackendState(base=0.005, per_input=0.0005, dim=OPENAI_DIM, known_models=[REMOTE_MODEL])
    elif plan.mode == "hybrid":  # Ollama's vectors at its own size, OpenAI's at the `dimensions` asked
        fake = FakeBackendState(base=0.005, per_input=0.0005, dim=OLLAMA_DIM, serial=True,
                                known_models=[LOCAL_MODEL, f"{LOCAL_MODEL}:latest", REMOTE_MODEL])
    async with hostile_world(tmp, fake=fake) as world:
        run = Run(world, plan)
        try:
            run.arrange()
            return await run.violations()
        finally:
            if plan.mode == "replicas":
                with trio.CancelScope(shield=True):
                    for d in world.daemons:  # stop them before their keys go
                        if d.alive():
                            await d.stop(10)
                    await drop_keys(run.prefix)


async def drop_keys(prefix: str) -> None:
    client = coredis.Redis.from_url(REDIS, decode_responses=True)
    async with client:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(keys)


@PROFILE
@given(plan=plans("ollama"))
async def test_every_property_holds_in_a_hostile_world_ollama(plan: Plan, tmp_path_factory: Any) -> None:
    violations = await run_plan(plan, tmp_path_factory.mktemp("hostile-ollama"))
    assert not violations, "\n".join(violations)


@PROFILE
@given(plan=plans("openai"))
async def test_every_property_holds_in_a_hostile_world_openai(plan: Plan, tmp_path_factory: Any) -> None:
    violations = await run_plan(plan, tmp_path_factory.mktemp("hostile-openai"))
    assert not violations, "\n".join(violations)


@PROFILE
@given(plan=plans("hybrid"))
async def test_every_property_holds_in_a_hostile_world_hybrid(plan: Plan, tmp_path_factory: Any) -> None:
    violations = await run_plan(plan, tmp_path_factory.mktemp("hostile-hybrid"))
    assert not violations, "\n".join(violations)


@PROFILE
@given(plan=plans("replicas"))
async def test_every_property_holds_in_a_hostile_world_two_replicas_on_redis(plan: Plan, tmp_path_factory: Any) -> None:
    violations = await run_plan(plan, tmp_path_factory.mktemp("hostile-replicas"))
    assert not violations, "\n".join(violations)
