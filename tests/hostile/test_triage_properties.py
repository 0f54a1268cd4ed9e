"""Properties over whole daemon runs of the triage chain (issues 11 and 13): the sandbox plays
the platform (`processor.sandbox.world`: each accepted result creates the chain's next tasks,
the callback refuses what the platform would refuse), a fake model server answers chat and
embeddings, a fake Wikidata answers lookups. Hypothesis draws how hostile that world is for
a few seconds (faults at every step of the task API and the token endpoint, a bad pending
body, bad token answers, chat answers that are bad or 429/500/503, Wikidata down, slow or
lagging, a SIGTERM or SIGKILL restart), then the world calms down and, once quiet:

- the daemon never exits on its own (a SIGTERM the plan sends ends it with exit 0);
- every claim's chain completes (embedding, people, topics, impact area, severity), and no
  task is `failed` or left `in_progress` or `pending`: a bad answer, a busy model or a
  Wikidata outage is never the task's defect (the hostile answers drawn stay below the
  bound past which a task is failed, `CHAT_BAD_ANSWER_RETRIES` x `MAX_TASK_ATTEMPTS`);
- the callback refused no result (each one is valid per CONTRACT.md section 6);
- no task reported `succeeded` twice with different results;
- no secret (client secret, API key, any access token issued) in the logs, /health, /ready
  or /metrics.

The daemon runs as its own process, as in `test_properties.py` (same profiles: a few
derandomized examples in CI, `HYPOTHESIS_PROFILE=nightly` explores).
"""

from __future__ import annotations

import copy
import functools
import signal
from pathlib import Path
from typing import Any

import attrs
import trio
from hypothesis import given
from hypothesis import strategies as st

from processor.sandbox.app import Fault, PendingShape, TokenAnswer
from processor.sandbox.fake_chat import BAD_KINDS
from processor.sandbox.harness import REMOTE_MODEL, Daemon
from processor.sandbox.harness import World as Outside
from processor.sandbox.world import World, make_world, serve_world

from .profiles import PROFILE
from .strategies import PENDING_SHAPES, ROUTE_FAULTS, TOKEN_ANSWERS

QUIET_TIMEOUT = 150.0  # generous: a busy CI machine; the wait ends as soon as the world is quiet
CHAT_OUTCOMES = st.sampled_from([*BAD_KINDS, "429", "500", "503", "good"])


@attrs.frozen
class Wikidata:
    """How the fake Wikidata behaves while the world is hostile."""

    mode: str  # ok | down | slow | maxlag
    maxlag_count: int = 0


WIKIDATA = st.one_of(
    st.builds(Wikidata, mode=st.sampled_from(["ok", "down", "slow"])),
    st.builds(Wikidata, mode=st.just("maxlag"), maxlag_count=st.integers(1, 4)),
)


@attrs.frozen
class Plan:
    """One hostile triage world (shrunk examples print as this)."""

    mode: str  # openai | ollama
    claims: int
    chat_script: tuple[str, ...]  # the chat fake's next answers, in order (then good ones)
    wikidata: Wikidata
    route_faults: dict[str, Fault]
    pending_shape: PendingShape | None
    token_answer: TokenAnswer | None
    hostile_for: float
    restart: str | None  # "term" | "kill"


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    return Plan(
        mode=draw(st.sampled_from(["openai", "ollama"])),
        claims=draw(st.integers(1, 4)),
        chat_script=tuple(draw(st.lists(CHAT_OUTCOMES, max_size=8))),  # < 3 x 5 bad answers: no task may be failed
        wikidata=draw(WIKIDATA),
        route_faults=draw(ROUTE_FAULTS),
        pending_shape=draw(PENDING_SHAPES),
        token_answer=draw(TOKEN_ANSWERS),
        hostile_for=draw(st.sampled_from([1.5, 3.0])),
        restart=draw(st.sampled_from([None, "term", "kill"])),
    )


def outside(world: World, tmp: Path) -> Outside:
    """The harness's view of the triage world: it starts daemon processes pointed at it and
    reads their logs and endpoints for secrets."""
    return Outside(world.sandbox, world.urls["api"], world.embeddings, world.urls["chat"], tmp)


def env(world: World, plan: Plan) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "WIKIDATA_API_URL": f"{world.urls['wikidata']}/w/api.php", "WIKIDATA_CONTACT": "tests@example.org",
        "WIKIDATA_TIMEOUT_SECONDS": "1",
    }
    if plan.mode == "ollama":
        extra.update(SUPPORTED_MODELS="nomic-embed-text", DEFAULT_MODEL="nomic-embed-text", MODEL_MAP="o3=qwen3:4b")
    return extra


def arrange(world: World, plan: Plan) -> None:
    if plan.mode == "openai":
        world.chain.embedding_model = REMOTE_MODEL
    world.chain.seed(plan.claims)
    world.sandbox.faults.update(copy.deepcopy(plan.route_faults))
    world.sandbox.pending_shape = copy.deepcopy(plan.pending_shape)
    world.sandbox.token_answer = copy.deepcopy(plan.token_answer)
    world.chat.script = list(plan.chat_script)
    world.wikidata.mode = plan.wikidata.mode
    world.wikidata.slow_seconds = 3.0
    world.wikidata.maxlag_count = plan.wikidata.maxlag_count


def calm(world: World) -> None:
    world.sandbox.calm()
    world.chat.script.clear()
    world.wikidata.mode = "ok"


async def live(world: World, o: Outside, plan: Plan, problems: list[str]) -> Daemon:
    d = await o.start(plan.mode, **env(world, plan))
    if plan.restart is None:
        await trio.sleep(plan.hostile_for)
    else:
        await trio.sleep(plan.hostile_for / 2)
        if plan.restart == "term":
            d.signal(signal.SIGTERM)
            code = await d.wait_exit(60)
            if code != 0:
                problems.append(f"SIGTERM ended the daemon with {code} (expected 0)\n{d.tail(3000)}")
                if code is None:
                    d.kill()
        else:
            d.kill()
        d = await o.start(plan.mode, **env(world, plan))
        await trio.sleep(plan.hostile_for / 2)
    calm(world)
    return d


def chain_quiet(world: World, n: int) -> bool:
    states = world.sandbox.by_state()
    return world.chain.complete() >= n and not states.get("pending") and not states.get("in_progress")


async def violations(world: World, o: Outside, plan: Plan) -> list[str]:
    problems: list[str] = []
    d = await live(world, o, plan, problems)
    await o.wait_quiet(QUIET_TIMEOUT, also=lambda: chain_quiet(world, plan.claims))
    v = list(problems)
    if not d.alive():
        v.append(f"daemon exited on its own (exit {d.proc.poll()}); log tail:\n{d.tail(3000)}")
    if world.chain.complete() < plan.claims:
        v.append(f"{plan.claims - world.chain.complete()} of {plan.claims} chain(s) not complete: {world.chain.summary()}")
    for tid, task in world.sandbox.tasks.items():
        state = task.get("state") if isinstance(task, dict) else None
        if state in ("failed", "in_progress", "pending"):
            v.append(f"{task.get('type')} task {tid} ended {state}" + (f" ({world.sandbox.reasons.get(tid)!r})" if state == "failed" else ""))
    if world.chain.refusals:
        v.append(f"the callback refused {len(world.chain.refusals)} result(s): {world.chain.refusals[:3]}")
    conflicting = [k for k, s in world.sandbox.callback_results.items() if len(s) > 1]
    if conflicting:
        v.append(f"{len(conflicting)} task(s) reported succeeded twice with different results: {conflicting[:3]}")
    for daemon in o.daemons:
        v += await o.leaks(daemon)
    if v:
        v.append(f"--- sandbox: {world.sandbox.stats()}\n--- chat: {world.chat.stats()}\n--- wikidata: {world.wikidata.stats()}"
                 f"\n--- logs: {o.tmp}")
    return v


async def run_plan(plan: Plan, tmp: Path) -> list[str]:
    world = make_world()
    stop = trio.Event()
    async with trio.open_nursery() as n:
        await n.start(functools.partial(serve_world, world, "127.0.0.1", shutdown=stop))
        o = outside(world, tmp)
        try:
            arrange(world, plan)
            return await violations(world, o, plan)
        finally:
            with trio.CancelScope(shield=True):
                for d in o.daemons:
                    if d.alive():
                        await d.stop(10)
            stop.set()


@PROFILE
@given(plan=plans())
async def test_every_property_holds_in_a_hostile_triage_world(plan: Plan, tmp_path_factory: Any) -> None:
    violations = await run_plan(plan, tmp_path_factory.mktemp("hostile-triage"))
    assert not violations, "\n".join(violations)
