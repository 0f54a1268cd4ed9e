"""The Wikidata adapter against the local fake (real HTTP on loopback), with real SQLite
files and the real Redis at 127.0.0.1:6379."""

from __future__ import annotations

import secrets

import pytest
import trio
from prometheus_client import CollectorRegistry

from processor.effects.asgi import serve_asgi
from processor.effects.chat.metrics import chat_metrics
from processor.effects.guard import Guard
from processor.effects.wikidata import MockWikidata, RedisCache, SqliteCache, Turn, Wikidata
from processor.pure.breaker import BreakerConfig
from processor.sandbox.fake_wikidata import FakeWikidata, FakeWikidataState, qid

PEOPLE = ["João Silva", "Maria Oliveira", "Jair Bolsonaro"]


@pytest.fixture
async def fake(nursery):
    state = FakeWikidataState()
    stop = trio.Event()
    url = await nursery.start(lambda task_status: serve_asgi(FakeWikidata(state), "127.0.0.1", 0, shutdown=stop, task_status=task_status))
    yield state, f"{url}/w/api.php"
    stop.set()


def adapter(url: str, tmp_path, *, registry=None, timeout=10.0, cache=None, turn=None, guard=None) -> Wikidata:
    return Wikidata(api_url=url, contact="ops@example.org", language="pt", timeout=timeout,
                    cache=cache or SqliteCache(tmp_path / "wikidata.db"), cache_ttl=7 * 86400,
                    metrics=chat_metrics(registry or CollectorRegistry()), turn=turn, guard=guard, request_timeout=5)


async def test_people_get_the_best_human_topics_the_best_match(fake, tmp_path):
    state, url = fake
    wd = adapter(url, tmp_path)
    people, why = await wd.resolve(PEOPLE, people=True)
    topics, why2 = await wd.resolve(["Vacinação", "Eleições"], people=False)
    await wd.aclose()
    assert why is None and why2 is None
    # the first search result is a disambiguation page; the person is the second
    assert {n: e.id for n, e in people.items() if e} == {n: qid(n, 1) for n in PEOPLE}
    assert people["João Silva"].description == "político brasileiro"
    assert {n: e.id for n, e in topics.items() if e} == {"Vacinação": qid("Vacinação", 0), "Eleições": qid("Eleições", 0)}
    assert state.requests == {"wbsearchentities": 5, "wbgetentities": 1}
    assert any("ops@example.org" in ua for ua in state.user_agents)


async def test_a_name_that_is_not_a_person_gets_no_id(fake, tmp_path):
    _, url = fake
    wd = adapter(url, tmp_path)
    found, why = await wd.resolve(["petrobras"], people=True)
    await wd.aclose()
    assert why is None and found == {"petrobras": None}


async def test_cache_answers_the_second_time_and_survives_a_restart(fake, tmp_path):
    state, url = fake
    registry = CollectorRegistry()
    first = adapter(url, tmp_path, registry=registry)
    await first.resolve(PEOPLE, people=True)
    await first.aclose()
    before = dict(state.requests)
    second = adapter(url, tmp_path, registry=registry)  # a new process: same SQLite file
    found, why = await second.resolve([" joão  SILVA ", *PEOPLE], people=True)
    await second.aclose()
    assert state.requests == before and why is None
    assert found[" joão  SILVA "].id == qid("João Silva", 1)
    assert registry.get_sample_value("wikidata_cache_lookups_total", {"kind": "search", "result": "hit"}) == 3


async def test_expired_entries_are_looked_up_again(fake, tmp_path):
    state, url = fake
    now = [1000.0]
    cache = SqliteCache(tmp_path / "w.db", clock=lambda: now[0])
    wd = Wikidata(api_url=url, contact="c", language="pt", timeout=10, cache=cache, cache_ttl=60,
                  metrics=chat_metrics(CollectorRegistry()))
    await wd.resolve(["Vacinação"], people=False)
    now[0] += 61
    await wd.resolve(["Vacinação"], people=False)
    await wd.aclose()
    assert state.requests["wbsearchentities"] == 2


async def test_getentities_takes_at_most_fifty_ids(fake, tmp_path):
    state, url = fake
    wd = adapter(url, tmp_path)
    names = [f"Pessoa Número{i}" for i in range(30)]  # 2 candidates each: 60 ids
    found, why = await wd.resolve(names, people=True)
    await wd.aclose()
    assert why is None and all(found[n] is not None for n in names)
    assert state.requests["wbgetentities"] == 2 and state.ids_requested == 60  # the fake refuses > 50


async def test_one_request_at_a_time(fake, tmp_path):
    state, url = fake
    state.latency = 0.02
    wd = adapter(url, tmp_path)
    async with trio.open_nursery() as n:
        for i in range(6):
            n.start_soon(lambda i=i: wd.resolve([f"Tema {i}", f"Outro {i}"], people=False))
    await wd.aclose()
    assert state.requests["wbsearchentities"] == 12 and state.max_in_flight == 1


async def test_maxlag_waits_retry_after_then_answers(fake, tmp_path):
    state, url = fake
    state.mode, state.maxlag_count, state.maxlag_retry_after = "maxlag", 1, 1
    wd = adapter(url, tmp_path)
    t0 = trio.current_time()
    found, why = await wd.resolve(["Vacinação"], people=False)
    waited = trio.current_time() - t0
    await wd.aclose()
    assert why is None and found["Vacinação"] is not None
    assert state.requests["wbsearchentities"] == 2 and waited >= 1.0  # Retry-After honoured (a lower bound)


async def test_down_goes_without_ids_and_the_breaker_opens(fake, tmp_path):
    state, url = fake
    state.mode = "down"
    registry = CollectorRegistry()
    guard = Guard("wikidata", BreakerConfig(threshold=2, base_wait=60))
    wd = adapter(url, tmp_path, registry=registry, guard=guard)
    reasons = [(await wd.resolve([f"Tema {i}"], people=False))[1] for i in range(3)]
    await wd.aclose()
    assert reasons == ["down", "down", "breaker_open"]
    assert state.requests["wbsearchentities"] == 2  # no request once open
    assert registry.get_sample_value("wikidata_enrichment_degraded_total", {"reason": "down"}) == 2


async def test_slow_is_bounded_and_keeps_what_was_found(fake, tmp_path):
    state, url = fake
    wd = adapter(url, tmp_path, timeout=0.5)
    await wd.resolve(["Vacinação"], people=False)  # cached
    state.mode = "slow"
    t0 = trio.current_time()
    found, why = await wd.resolve(["Vacinação", "Eleições"], people=False)
    elapsed = trio.current_time() - t0
    await wd.aclose()
    assert why == "slow" and found == {"Vacinação": found["Vacinação"]} and found["Vacinação"] is not None
    assert elapsed < 20  # bounded by WIKIDATA_TIMEOUT_SECONDS, not the fake's 30 s


async def test_redis_cache_and_turn_are_shared_by_replicas(fake, tmp_path):
    import coredis

    state, url = fake
    state.latency = 0.02
    prefix = f"test-{secrets.token_hex(4)}"
    clients = [coredis.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True) for _ in range(2)]
    async with clients[0], clients[1]:
        try:
            replicas = [adapter(url, tmp_path, cache=RedisCache(c, prefix=prefix), turn=Turn(c, prefix=prefix)) for c in clients]
            async with trio.open_nursery() as n:
                for i, r in enumerate(replicas):
                    n.start_soon(lambda r=r, i=i: r.resolve([f"Tema {i}-{j}" for j in range(4)], people=False))
            assert state.max_in_flight == 1 and state.requests["wbsearchentities"] == 8
            assert await clients[0].exists([f"{prefix}:wikidata:search:pt:tema 0-0"]) == 1
            # replica 1 finds in Redis what replica 0 looked up
            found, why = await replicas[1].resolve([f"Tema 0-{j}" for j in range(4)], people=False)
            assert why is None and all(found.values()) and state.requests["wbsearchentities"] == 8
            for r in replicas:
                await r.aclose()
        finally:
            keys = await clients[0].keys(f"{prefix}:*")
            if keys:
                await clients[0].delete(list(keys))


async def test_mock_wikidata_is_stable():
    wd = MockWikidata()
    a, _ = await wd.resolve(["João Silva"], people=True)
    b, _ = await wd.resolve(["joão silva"], people=True)
    assert a["João Silva"].id == b["joão silva"].id and a["João Silva"].id.startswith("Q")


async def test_cache_file_is_private_and_a_broken_one_never_stops_the_start(fake, tmp_path):
    import os

    state, url = fake
    wd = adapter(url, tmp_path)
    await wd.resolve(["Vacinação"], people=False)
    await wd.aclose()
    modes = {p.name: oct(os.stat(p).st_mode & 0o777) for p in tmp_path.glob("wikidata.db*")}
    assert modes and all(m == "0o600" for m in modes.values()), modes
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "wikidata.db").mkdir()  # not a file: unusable
    wd = adapter(url, tmp_path, cache=SqliteCache(tmp_path / "bad" / "wikidata.db"))
    found, why = await wd.resolve(["Vacinação", "Vacinação"], people=False)
    await wd.aclose()
    assert why is None and found["Vacinação"] is not None


async def test_the_same_name_asked_at_once_is_one_request(fake, tmp_path):
    state, url = fake
    state.latency = 0.05
    wd = adapter(url, tmp_path)
    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(lambda: wd.resolve(["João Silva", "Vacinação"], people=True))
    await wd.aclose()
    assert state.requests == {"wbsearchentities": 2, "wbgetentities": 1}


async def test_a_caller_that_gives_up_never_overlaps_requests_and_the_answer_is_kept(fake, tmp_path):
    state, url = fake
    state.latency = 0.4
    wd = adapter(url, tmp_path, timeout=0.1)
    wd._request_timeout = 5.0  # the request itself may take its time; the caller's bound is 0.1 s
    async with trio.open_nursery() as n:
        n.start_soon(lambda: wd.resolve(["Tema A"], people=False))
        await trio.sleep(0.02)  # A holds the turn; B gives up waiting for it, before sending anything
        n.start_soon(lambda: wd.resolve(["Tema B"], people=False))
    assert state.max_in_flight == 1
    with trio.fail_after(60):
        async with wd._turn:  # held until the shielded request of the first caller is answered and cached
            pass
    found, why = await adapter(url, tmp_path).resolve(["Tema A"], people=False)
    await wd.aclose()
    assert why is None and found["Tema A"] is not None and state.requests["wbsearchentities"] == 1
