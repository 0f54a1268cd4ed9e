"""The sandbox plays the platform's triage chain (CONTRACT.md §6), over real HTTP."""

from __future__ import annotations

import httpx
import pytest

from processor.sandbox import SandboxState
from processor.sandbox.chain import Chain, refusal


async def client_for(sb) -> httpx.AsyncClient:
    http = httpx.AsyncClient(base_url=sb.url)
    token = (await http.post("/oauth2/token", data={"grant_type": "client_credentials", "scope": "read write"},
                             auth=(sb.state.client_id, sb.state.client_secret))).json()["access_token"]
    http.headers["Authorization"] = f"Bearer {token}"
    return http


async def pending(http: httpx.AsyncClient, task_type: str) -> list[dict]:
    return [t for t in (await http.get("/api/ai-tasks/pending")).json() if t["type"] == task_type]


async def succeed(http, task, result) -> httpx.Response:
    return await http.patch(f"/api/ai-tasks/{task['_id']}", json={"state": "succeeded", "result": result})


PEOPLE = {"personalities": [{"name": "João Silva", "wikidata": {"id": "Q1", "label": "João Silva"}}, {"name": "Ana"}]}
TOPICS = [{"name": "Vacinação", "wikidataId": "Q2", "language": "pt"}]
AREA = {"name": "Saúde", "description": "x", "wikidataId": None, "language": "pt"}


async def test_each_accepted_result_creates_the_next_tasks(sandbox):
    chain = Chain(sandbox.state)
    (target,) = chain.seed(1)
    http = await client_for(sandbox)
    (emb,) = await pending(http, "text_embedding")
    assert emb["content"]["text"] == chain.targets[target].text and emb["callbackParams"] == {"targetId": target, "field": "embedding"}
    assert (await succeed(http, emb, [0.1, 0.2])).status_code == 200
    (ident,) = await pending(http, "identifying_data")
    assert ident["content"] == {"text": chain.targets[target].text, "model": "o3"}
    assert ident["callbackRoute"] == "verification_update_identifying_data"
    assert ident["callbackParams"] == {"targetId": target, "field": "identifiedData"}
    assert (await succeed(http, ident, PEOPLE)).status_code == 200
    (topics,) = await pending(http, "defining_topics")
    (area,) = await pending(http, "defining_impact_area")
    assert (await succeed(http, topics, TOPICS)).status_code == 200
    assert await pending(http, "defining_severity") == []  # needs both
    assert (await succeed(http, area, AREA)).status_code == 200
    (sev,) = await pending(http, "defining_severity")
    assert sev["content"]["impactArea"] == {"name": "Saúde", "language": "pt", "wikidataId": None}
    assert sev["content"]["topics"] == [{"name": "Vacinação", "language": "pt", "wikidataId": "Q2"}]
    assert sev["content"]["personalities"] == [{"name": "João Silva", "wikidataId": "Q1"}, {"name": "Ana", "wikidataId": None}]
    assert (await succeed(http, sev, {"severity": "high_1"})).status_code == 200
    assert chain.complete() == 1 and sum(chain.refused.values()) == 0
    await http.aclose()


@pytest.mark.parametrize(
    ("task_type", "result"),
    [
        ("identifying_data", [{"name": "x"}]),
        ("identifying_data", {"personalities": [{"name": ""}]}),
        ("identifying_data", {"personalities": [{"name": "x", "wikidata": {"id": "x"}}]}),
        ("defining_topics", []),
        ("defining_topics", {"topics": TOPICS}),
        ("defining_topics", [{"name": "Vacinação"}]),
        ("defining_impact_area", {"description": "x", "language": "pt"}),
        ("defining_severity", "medium"),
        ("defining_severity", {"severity": "Medium_2"}),
        ("text_embedding", []),
    ],
)
def test_refused_shapes(task_type, result):
    assert refusal(task_type, result) is not None


@pytest.mark.parametrize(
    ("task_type", "result"),
    [("identifying_data", {"personalities": []}), ("identifying_data", PEOPLE), ("defining_topics", TOPICS),
     ("defining_impact_area", AREA), ("defining_severity", "critical"), ("defining_severity", {"severity": "low_1"})],
)
def test_accepted_shapes(task_type, result):
    assert refusal(task_type, result) is None


async def test_a_refused_result_is_400_with_the_state_already_succeeded(sandbox):
    chain = Chain(sandbox.state)
    chain.seed(1)
    http = await client_for(sandbox)
    (emb,) = await pending(http, "text_embedding")
    await succeed(http, emb, [0.5])
    (ident,) = await pending(http, "identifying_data")
    resp = await succeed(http, ident, {"people": []})
    assert resp.status_code == 400 and "refused" in resp.json()["message"]
    assert sandbox.state.tasks[ident["_id"]]["state"] == "succeeded"
    assert chain.refused["identifying_data"] == 1 and await pending(http, "defining_topics") == []
    await http.aclose()


async def test_an_identical_repeat_is_ignored_and_creates_nothing(sandbox):
    chain = Chain(sandbox.state)
    chain.seed(1)
    http = await client_for(sandbox)
    (emb,) = await pending(http, "text_embedding")
    await succeed(http, emb, [0.5])
    await succeed(http, emb, [0.5])
    assert len(await pending(http, "identifying_data")) == 1 and chain.ignored_repeats == 1
    await http.aclose()


def test_claim_texts_vary_and_name_people():
    chain = Chain(SandboxState())
    chain.seed(50)
    texts = [t.text for t in chain.targets.values()]
    assert len(set(texts)) == 50
    assert sum(1 for x in texts if "Silva" in x or "Oliveira" in x or "Bolsonaro" in x) > 10
