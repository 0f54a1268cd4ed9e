"""The whole chain end to end: the real daemon against the sandbox playing the platform
(processor.sandbox.world: the task API with the chain, a fake model server, a fake
Wikidata), in mock, openai and ollama modes, with bad answers and a bad Wikidata."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import trio

from processor.config import load_settings
from processor.daemon import Daemon
from processor.pure.triage import IMPACT_AREAS, SEVERITY_LEVELS
from processor.sandbox.world import World, make_world, serve_world
from tests.conftest import running, wait_until

TRIAGE = ("identifying_data", "defining_topics", "defining_impact_area", "defining_severity")


@pytest.fixture
async def world(nursery):
    w = make_world()
    stop = trio.Event()
    await nursery.start(functools.partial(serve_world, w, "127.0.0.1", shutdown=stop))
    yield w
    stop.set()


def settings_for(world: World, tmp_path, mode: str, **extra: Any):
    env = {**world.env(), "PROCESSING_MODE": mode, "STATE_DIR": str(tmp_path / "state"), "METRICS_HOST": "127.0.0.1",
           "METRICS_PORT": "0", "RATE_LIMIT_ENABLED": "false", "SHUTDOWN_GRACE_SECONDS": "5", "POLLING_INTERVAL_SECONDS": "0.2",
           "WIKIDATA_CONTACT": "tests@example.org"}
    if mode == "openai":
        env["OPENAI_API_KEY"] = "sk-test"
        world.chain.embedding_model = "text-embedding-3-small"
    if mode == "ollama":
        env.update(SUPPORTED_MODELS="nomic-embed-text", DEFAULT_MODEL="nomic-embed-text", MODEL_MAP="o3=qwen3:4b")
    if mode == "mock" and not extra.pop("fake_wikidata", False):
        env.pop("WIKIDATA_API_URL")  # mock mode fakes Wikidata itself: nothing leaves the machine
    env.update({k: str(v) for k, v in extra.items()})
    return load_settings(env, dotenv_path=None)[0]


def chain_done(world: World, n: int):
    def pred() -> bool:
        states = world.sandbox.by_state()
        return world.chain.complete() >= n and states.get("in_progress", 0) == 0 and states.get("pending", 0) == 0
    return pred


def failed(world: World) -> list[tuple[str, str]]:
    return [(t["type"], world.sandbox.reasons.get(i, "")) for i, t in world.sandbox.tasks.items()
            if isinstance(t, dict) and t.get("state") == "failed"]


async def run_chain(world: World, settings, n: int, timeout: float = 120) -> Daemon:
    world.chain.seed(n)
    daemon = Daemon(settings)
    async with running(daemon):
        await wait_until(chain_done(world, n), timeout=timeout)
    return daemon


@pytest.mark.parametrize("mode", ["mock", "openai", "ollama"])
async def test_each_type_end_to_end(world, tmp_path, mode):
    await run_chain(world, settings_for(world, tmp_path, mode), 5)
    assert failed(world) == [] and sum(world.chain.refused.values()) == 0
    assert world.chain.accepted == {t: 5 for t in ("text_embedding", *TRIAGE)}
    for target in world.chain.targets.values():
        r = target.results
        people = r["identifiedData"]["personalities"]
        assert people and all(p["wikidata"]["id"].startswith("Q") for p in people), people
        assert r["topics"] and all(t["language"] == "pt" for t in r["topics"])
        assert r["impactArea"]["name"] in IMPACT_AREAS
        assert r["severity"]["severity"] in SEVERITY_LEVELS
    if mode != "mock":
        assert world.chat.by_task_type == {t: 5 for t in TRIAGE}  # one model call per task
        assert world.wikidata.max_in_flight == 1


async def test_renamed_routes_are_processed(world, tmp_path):
    world.chain.route_names = {"identifying_data": "verification_update_identified_data",
                               "defining_topics": "verification_update_topics", "defining_severity": "some_future_route"}
    await run_chain(world, settings_for(world, tmp_path, "mock"), 2)
    assert world.chain.complete() == 2 and failed(world) == []


@pytest.mark.parametrize("bad", ["invalid_json", "out_of_enum", "refusal", "cutoff", "wrong_type", "empty_list"])
async def test_every_bad_answer_kind_is_asked_again_never_failed(world, tmp_path, bad):
    world.chat.script = [bad] * 4  # the first answers of the run are bad
    await run_chain(world, settings_for(world, tmp_path, "openai"), 2)
    assert failed(world) == [] and sum(world.chain.refused.values()) == 0
    assert world.chat.answers[bad] == 4


async def test_bad_answers_past_the_bound_are_released_then_failed_with_the_reason(world, tmp_path):
    world.chat.bad_rate, world.chat.bad_kinds = 1.0, ("out_of_enum",)
    settings = settings_for(world, tmp_path, "openai", MAX_TASK_ATTEMPTS=2, CHAT_BAD_ANSWER_RETRIES=1)
    world.chain.seed(1)
    async with running(Daemon(settings)):
        await wait_until(lambda: bool(failed(world)))
    ((task_type, reason),) = failed(world)
    assert task_type == "identifying_data" and reason
    assert sum(world.chain.refused.values()) == 0


async def test_bare_string_content_is_failed_with_a_reason(world, tmp_path):
    task = world.sandbox.create({"type": "defining_topics", "content": "just a string",
                                 "callbackRoute": "verification_update_defining_topics",
                                 "callbackParams": {"targetId": "f" * 24, "field": "topics"}})
    async with running(Daemon(settings_for(world, tmp_path, "mock"))):
        await wait_until(lambda: world.sandbox.tasks[task["_id"]]["state"] == "failed")
    assert "bare string" in world.sandbox.reasons[task["_id"]]


async def test_a_model_nobody_serves_stays_pending_and_is_named_in_health(world, tmp_path):
    world.chat.pullable = set()
    settings = settings_for(world, tmp_path, "ollama", MODEL_MAP="")  # o3 is not an Ollama model
    world.chain.seed(1)
    daemon = Daemon(settings)
    async with running(daemon):
        await wait_until(lambda: world.chain.accepted["text_embedding"] == 1)
        await wait_until(lambda: "o3" in str(daemon.health()))
    ident = [t for t in world.sandbox.tasks.values() if t["type"] == "identifying_data"]
    assert len(ident) == 1 and ident[0]["state"] == "pending" and failed(world) == []


@pytest.mark.parametrize("mode", ["down", "slow", "maxlag"])
async def test_wikidata_trouble_sends_results_without_ids(world, tmp_path, mode):
    world.wikidata.mode, world.wikidata.slow_seconds, world.wikidata.maxlag_count = mode, 30, 2
    settings = settings_for(world, tmp_path, "openai", WIKIDATA_TIMEOUT_SECONDS="10" if mode == "maxlag" else "2")
    await run_chain(world, settings, 3)
    assert failed(world) == [] and sum(world.chain.refused.values()) == 0
    people = [p for t in world.chain.targets.values() for p in t.results["identifiedData"]["personalities"]]
    if mode == "maxlag":  # waited Retry-After (twice), then answered: ids are there
        assert people and all("wikidata" in p for p in people)
        assert world.wikidata.maxlag_count == 0 and world.wikidata.max_in_flight == 1
    else:
        assert people and all("wikidata" not in p for p in people)


async def test_worker_runs_only_the_types_it_is_told(world, tmp_path):
    world.chain.seed(2)
    async with running(Daemon(settings_for(world, tmp_path, "mock", TASK_TYPES="text_embedding"))):
        await wait_until(lambda: world.chain.accepted["text_embedding"] == 2)
        await trio.sleep(1)
    assert world.chain.accepted["identifying_data"] == 0
    assert {t["state"] for t in world.sandbox.tasks.values() if t["type"] == "identifying_data"} == {"pending"}
    async with running(Daemon(settings_for(world, tmp_path, "mock", TASK_TYPES=",".join(TRIAGE)))):
        await wait_until(chain_done(world, 2))
    assert failed(world) == []


@pytest.mark.slow
async def test_100_claims_at_default_polling_and_concurrency(world, tmp_path):
    """Done-when: 100 claims through the whole chain, chat answers taking 800 ms, default
    POLLING_INTERVAL_SECONDS and CONCURRENCY_LIMIT: 0 failed, 0 refused, within 300 s."""
    world.chat.latency = 0.8
    settings = load_settings(_env_of(world, tmp_path), dotenv_path=None)[0]
    assert settings.polling_interval_seconds == 30 and settings.concurrency_limit == 5
    await run_chain(world, settings, 100, timeout=300)
    assert failed(world) == [] and sum(world.chain.refused.values()) == 0 and world.chain.complete() == 100


@pytest.mark.slow
async def test_100_claims_with_30_percent_bad_answers(world, tmp_path):
    world.chat.latency, world.chat.bad_rate = 0.8, 0.3
    settings = load_settings(_env_of(world, tmp_path), dotenv_path=None)[0]
    await run_chain(world, settings, 100, timeout=300)
    assert failed(world) == [] and sum(world.chain.refused.values()) == 0 and world.chain.complete() == 100
    assert sum(n for k, n in world.chat.answers.items() if k != "good") > 50


def _env_of(world: World, tmp_path) -> dict[str, str]:
    """Defaults, except what points at the world (no POLLING_INTERVAL_SECONDS, no CONCURRENCY_LIMIT)."""
    world.chain.embedding_model = "text-embedding-3-small"
    return {**world.env(), "PROCESSING_MODE": "openai", "OPENAI_API_KEY": "sk-test", "STATE_DIR": str(tmp_path / "state"),
            "METRICS_HOST": "127.0.0.1", "METRICS_PORT": "0", "RATE_LIMIT_ENABLED": "false", "WIKIDATA_CONTACT": "tests@example.org"}


async def test_every_task_counts_against_the_rate_limit_whatever_its_type(world, tmp_path):
    world.chain.seed(1)
    settings = settings_for(world, tmp_path, "mock", RATE_LIMIT_ENABLED="true", RATE_LIMIT_PER_HOUR="3")
    async with running(Daemon(settings)):
        await wait_until(lambda: world.sandbox.by_state().get("succeeded", 0) == 3)
        await trio.sleep(1.5)  # several polls: nothing more is claimed this hour
        states = world.sandbox.by_state()
    assert states == {"succeeded": 3, "pending": 1}  # embedding, identifying_data, one of topics/area
    assert world.chain.accepted["text_embedding"] == 1 and world.chain.accepted["identifying_data"] == 1


@pytest.mark.parametrize(("grace", "expected"), [("0.3", "pending"), ("60", "succeeded")])
async def test_a_chat_call_at_shutdown_gets_the_grace_then_is_released(world, tmp_path, grace, expected):
    world.chat.latency = 2.0
    world.chain.seed(1)
    daemon = Daemon(settings_for(world, tmp_path, "openai", SHUTDOWN_GRACE_SECONDS=grace))
    async with trio.open_nursery() as n:
        n.start_soon(daemon.run)
        await wait_until(lambda: world.chat.in_flight == 1)
        daemon.stop()
    (ident,) = [t for t in world.sandbox.tasks.values() if t["type"] == "identifying_data"]
    assert ident["state"] == expected and failed(world) == []
