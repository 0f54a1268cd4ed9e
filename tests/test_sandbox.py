"""The sandbox follows CONTRACT.md §1-§2 to the letter, awkward parts included."""

from __future__ import annotations

import httpx
import orjson
import trio

TOKEN_FORM = {"grant_type": "client_credentials", "scope": "read write"}


async def token(client: httpx.AsyncClient, sb) -> str:
    r = await client.post("/oauth2/token", data=TOKEN_FORM, auth=(sb.state.client_id, sb.state.client_secret))
    assert r.status_code == 200
    return r.json()["access_token"]


async def test_token_basic_and_post_auth_and_errors(sandbox):
    async with httpx.AsyncClient(base_url=sandbox.url) as c:
        r = await c.post("/oauth2/token", data=TOKEN_FORM, auth=(sandbox.state.client_id, sandbox.state.client_secret))
        body = r.json()
        assert r.status_code == 200 and body["token_type"].lower() == "bearer" and body["expires_in"] > 0
        r = await c.post("/oauth2/token", data={**TOKEN_FORM, "client_id": sandbox.state.client_id, "client_secret": sandbox.state.client_secret})
        assert r.status_code == 200
        r = await c.post("/oauth2/token", data=TOKEN_FORM, auth=(sandbox.state.client_id, "wrong"))
        assert r.status_code == 401 and r.json()["error"] == "invalid_client"
        r = await c.post("/oauth2/token", data={**TOKEN_FORM, "scope": "admin"}, auth=(sandbox.state.client_id, sandbox.state.client_secret))
        assert r.status_code == 400 and r.json()["error"] == "invalid_scope"
        r = await c.post("/oauth2/token", json=TOKEN_FORM, auth=(sandbox.state.client_id, sandbox.state.client_secret))
        assert r.status_code == 400


async def test_every_route_needs_a_valid_token_and_tokens_expire(sandbox):
    sandbox.state.token_lifetime = 0.3
    async with httpx.AsyncClient(base_url=sandbox.url) as c:
        assert (await c.get("/api/ai-tasks/pending")).status_code == 401
        assert (await c.get("/api/ai-tasks/pending", headers={"Authorization": "Bearer nope"})).status_code == 401
        tok = await token(c, sandbox)
        h = {"Authorization": f"Bearer {tok}"}
        assert (await c.get("/api/ai-tasks/pending", headers=h)).status_code == 200
        await trio.sleep(0.35)
        assert (await c.get("/api/ai-tasks/pending", headers=h)).status_code == 401
        tok = await token(c, sandbox)
        sandbox.state.revoke_all()
        assert (await c.get("/api/ai-tasks/pending", headers={"Authorization": f"Bearer {tok}"})).status_code == 401


async def test_pending_lists_every_task_oldest_first_and_ignores_limit(sandbox):
    ids = sandbox.state.seed(1200)
    async with httpx.AsyncClient(base_url=sandbox.url) as c:
        h = {"Authorization": f"Bearer {await token(c, sandbox)}"}
        r = await c.get("/api/ai-tasks/pending?limit=5", headers=h)
        body = r.json()
        assert [t["_id"] for t in body] == ids  # all of them, in creation order
        t = body[0]
        assert set(t) >= {"_id", "type", "state", "content", "callbackRoute", "callbackParams", "createdAt", "updatedAt", "__v"}


async def test_patch_contract(sandbox):
    tid = sandbox.state.seed(1)[0]
    async with httpx.AsyncClient(base_url=sandbox.url) as c:
        h = {"Authorization": f"Bearer {await token(c, sandbox)}"}
        assert (await c.patch("/api/ai-tasks/not-an-id", json={"state": "failed"}, headers=h)).status_code == 400
        assert (await c.patch(f"/api/ai-tasks/{tid}", json={"state": "done"}, headers=h)).status_code == 400
        assert (await c.patch("/api/ai-tasks/" + "0" * 24, json={"state": "failed"}, headers=h)).status_code == 404
        big = [0.123456789] * (10 * 1024 * 1024 // 11 + 10)
        r = await c.patch(f"/api/ai-tasks/{tid}", content=orjson.dumps({"state": "succeeded", "result": big}), headers={**h, "Content-Type": "application/json"})
        assert r.status_code == 400
        # unconditional: two claims both succeed
        assert (await c.patch(f"/api/ai-tasks/{tid}", json={"state": "in_progress"}, headers=h)).status_code == 200
        assert (await c.patch(f"/api/ai-tasks/{tid}", json={"state": "in_progress"}, headers=h)).status_code == 200
        r = await c.get("/api/ai-tasks/pending", headers=h)
        assert r.json() == []  # in_progress tasks leave the pending list
        r = await c.patch(f"/api/ai-tasks/{tid}", json={"state": "succeeded", "result": [0.1, 0.2], "extra": "ignored"}, headers=h)
        assert r.status_code == 200 and r.json()["result"] == [0.1, 0.2]
        await c.patch(f"/api/ai-tasks/{tid}", json={"state": "succeeded", "result": [0.1, 0.2]}, headers=h)
        assert sandbox.state.callbacks[tid] == 2  # a second succeeded dispatches again
        r = await c.get("/api/ai-tasks?state=succeeded", headers=h)
        assert [t["_id"] for t in r.json()] == [tid]
        r = await c.post("/api/ai-tasks", json={"type": "text_embedding", "content": {"text": "x", "model": "m"}}, headers=h)
        assert r.status_code == 201 and r.json()["state"] == "pending"


async def test_faults_fail_then_recover(sandbox):
    sandbox.state.seed(1)
    async with httpx.AsyncClient(base_url=sandbox.url) as c:
        h = {"Authorization": f"Bearer {await token(c, sandbox)}"}
        r = await c.post("/_sandbox/faults", json={"route": "pending", "status": 503, "count": 2})
        assert r.status_code == 200
        codes = [(await c.get("/api/ai-tasks/pending", headers=h)).status_code for _ in range(3)]
        assert codes == [503, 503, 200]
