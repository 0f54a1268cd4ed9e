"""The sandbox follows CONTRACT.md §1-§2 to the letter, awkward parts included."""

from __future__ import annotations

import base64

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
    now = [1_780_000_000.0]
    sandbox.state.clock = lambda: now[0]  # the token's lifetime runs on this clock, not on how fast the machine is
    sandbox.state.token_lifetime = 0.3
    async with httpx.AsyncClient(base_url=sandbox.url) as c:
        assert (await c.get("/api/ai-tasks/pending")).status_code == 401
        assert (await c.get("/api/ai-tasks/pending", headers={"Authorization": "Bearer nope"})).status_code == 401
        tok = await token(c, sandbox)
        h = {"Authorization": f"Bearer {tok}"}
        assert (await c.get("/api/ai-tasks/pending", headers=h)).status_code == 200
        now[0] += 0.35
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


# --- the hostile world (issue 11) -------------------------------------------------------


async def test_raw_entries_are_served_as_bytes_and_can_be_patched(sandbox):
    st = sandbox.state
    good = st.seed(1)[0]
    tid = st.new_id()
    raw = b'{"_id":"' + tid.encode() + b'","type":"text_embedding","content":{"text":"a\\ud800","model":"m"},"__v":18446744073709551616}'
    st.insert_raw_bytes(raw, tid)
    st.insert_raw_bytes(b"[[[[[[1]]]]]]")
    async with httpx.AsyncClient(base_url=sandbox.url) as c:
        h = {"Authorization": f"Bearer {await token(c, sandbox)}"}
        body = (await c.get("/api/ai-tasks/pending", headers=h)).content
        assert raw in body and b"[[[[[[1]]]]]]" in body and body.startswith(b"[{")
        assert (await c.patch(f"/api/ai-tasks/{tid}", json={"state": "failed", "reason": "lone surrogate"}, headers=h)).status_code == 200
        assert raw not in (await c.get("/api/ai-tasks/pending", headers=h)).content
        assert st.reasons[tid] == "lone surrogate" and st.tasks[good]["state"] == "pending"
        # the real API's id check: exactly 24 hex, a trailing newline is not an id
        assert (await c.patch(f"/api/ai-tasks/{good}%0A", json={"state": "failed"}, headers=h)).status_code == 400


async def test_pending_shapes(sandbox):
    from processor.sandbox.app import PendingShape

    st = sandbox.state
    st.seed(300)
    async with httpx.AsyncClient(base_url=sandbox.url) as c:
        h = {"Authorization": f"Bearer {await token(c, sandbox)}"}
        for raw in (b"{}", b"null", b"<html>oops</html>"):
            st.pending_shape = PendingShape(mode="raw", raw=raw, count=1)
            assert (await c.get("/api/ai-tasks/pending", headers=h)).content == raw
        assert len((await c.get("/api/ai-tasks/pending", headers=h)).json()) == 300  # count ran out
        st.pending_shape = PendingShape(mode="wrap")
        assert len((await c.get("/api/ai-tasks/pending", headers=h)).json()["data"]) == 300
        st.pending_shape = PendingShape(truncate_at=5000)
        try:
            await c.get("/api/ai-tasks/pending", headers=h)
            raise AssertionError("a truncated body must break the transfer")
        except httpx.HTTPError:
            pass
        st.pending_shape = PendingShape(drip_bytes=4096, drip_interval=0.01)
        assert len((await c.get("/api/ai-tasks/pending", headers=h)).json()) == 300
        r = await c.post("/_sandbox/calm")
        assert r.status_code == 200 and st.pending_shape is None


async def test_token_answers_and_step_faults(sandbox):
    from processor.sandbox.app import Fault, TokenAnswer

    st = sandbox.state
    tid = st.seed(1)[0]
    async with httpx.AsyncClient(base_url=sandbox.url) as c:
        st.token_answer = TokenAnswer(fields={"expires_in": b"NaN", "access_token": b'"t\\u00f6k-1234"'}, drop=("token_type",), count=1)
        r = await c.post("/oauth2/token", data=TOKEN_FORM, auth=(st.client_id, st.client_secret))
        assert b'"expires_in":NaN' in r.content and "token_type" not in r.text
        assert st.token_valid("tök-1234") and "tök-1234" in st.issued
        h = {"Authorization": f"Bearer {await token(c, sandbox)}"}  # count ran out: a normal answer
        st.faults["claim"] = Fault(status=500, count=1)
        st.faults["report"] = [Fault(status=403, count=1), Fault(status=400, apply=True, count=1)]
        assert (await c.patch(f"/api/ai-tasks/{tid}", json={"state": "in_progress"}, headers=h)).status_code == 500
        assert (await c.patch(f"/api/ai-tasks/{tid}", json={"state": "in_progress"}, headers=h)).status_code == 200
        assert (await c.patch(f"/api/ai-tasks/{tid}", json={"state": "succeeded", "result": [1.0]}, headers=h)).status_code == 403
        assert st.tasks[tid]["state"] == "in_progress"
        assert (await c.patch(f"/api/ai-tasks/{tid}", json={"state": "succeeded", "result": [1.0]}, headers=h)).status_code == 400
        assert st.tasks[tid]["state"] == "succeeded"  # applied, then refused: as the real callback does
        st.faults["pending"] = Fault(status=200, body=b"<html>maintenance</html>", content_type="text/html")
        r = await c.get("/api/ai-tasks/pending", headers=h)
        assert r.status_code == 200 and r.text.startswith("<html>")
        r = await c.post("/_sandbox/faults", json={"route": "token", "faults": [{"drop": True, "count": 1}]})
        assert r.status_code == 200
        try:
            await c.post("/oauth2/token", data=TOKEN_FORM, auth=(st.client_id, st.client_secret))
            raise AssertionError("a dropped connection must not answer")
        except httpx.HTTPError:
            pass


async def _asgi(app, path: str, body: dict) -> tuple[int, bytes]:
    """Call an ASGI app directly (no sockets: works under a virtual clock)."""
    import orjson as _o

    sent = []
    msgs = [{"type": "http.request", "body": _o.dumps(body), "more_body": False}]

    async def receive():
        return msgs.pop(0) if msgs else {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    await app({"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def test_fake_backend_answers(autojump_clock):
    from processor.sandbox.fake_backends import Answer, FakeBackendState, FakeEmbeddings

    st = FakeBackendState(base=0, per_input=0, dim=8)
    app = FakeEmbeddings(st)
    one = {"model": "m", "input": ["a", "b"]}
    st.answers = [Answer("null", count=1), Answer("html", count=1), Answer("nan", count=1), Answer("wrong_count", count=1)]
    assert (await _asgi(app, "/api/embed", one))[1] == b'{"model":"m","embeddings":null}'
    assert (await _asgi(app, "/v1/embeddings", one))[1].startswith(b"<html>")
    assert b"[NaN," in (await _asgi(app, "/api/embed", one))[1]
    assert len(orjson.loads((await _asgi(app, "/api/embed", one))[1])["embeddings"]) == 1
    assert len(orjson.loads((await _asgi(app, "/api/embed", one))[1])["embeddings"]) == 2  # calm again
    st.native_dim = 384
    status, body = await _asgi(app, "/v1/embeddings", {**one, "dimensions": 1024})
    assert status == 400 and b"matryoshka_dim=1024 is not in a valid range" in body
    st.dimensions_mode = "ignore"
    status, body = await _asgi(app, "/v1/embeddings", {**one, "dimensions": 1024})
    assert status == 200 and len(base64.b64decode(orjson.loads(body)["data"][0]["embedding"])) == 384 * 4
    st.poison = ["POISON"]
    assert (await _asgi(app, "/api/embed", {"model": "m", "input": ["x", "POISON y"]}))[0] == 500
    assert (await _asgi(app, "/api/embed", {"model": "m", "input": ["x"]}))[0] == 200
    assert (await _asgi(app, "/api/embed", {"model": "m", "input": ["x"], "keep_alive": "-1"}))[0] == 400  # Go's ParseDuration
    assert (await _asgi(app, "/api/embed", {"model": "m", "input": ["x"], "keep_alive": -1}))[0] == 200
    assert [r["keep_alive"] for r in list(st.received)[-2:]] == ["-1", -1]
    st.calm()
    st.busy = 0.2
    codes = [(await _asgi(app, "/api/embed", {"model": "m", "input": ["x"]}))[0] for _ in range(500)]
    assert 60 <= codes.count(503) <= 140 and set(codes) == {200, 503}


async def test_slow_server_computes_one_at_a_time_and_finishes_abandoned_requests(autojump_clock):
    from processor.sandbox.fake_backends import SLOW_PER_CHAR, FakeBackendState, FakeEmbeddings

    st = FakeBackendState(base=0, dim=4, slow_per_char=SLOW_PER_CHAR)
    app = FakeEmbeddings(st)
    text = "x" * 2000  # 1 s
    t0 = trio.current_time()
    with trio.move_on_after(0.5):  # the client gives up on a 2-text request (2 s of work)
        await _asgi(app, "/api/embed", {"model": "m", "input": [text, text]})
    done = []

    async def one(i):
        await _asgi(app, "/api/embed", {"model": "m", "input": [text]})
        done.append((i, trio.current_time() - t0))

    async with trio.open_nursery() as n:
        n.start_soon(one, 1)
        await trio.sleep(0.01)
        n.start_soon(one, 2)
    # the abandoned request still ran until t=2, then one at a time: 3 and 4
    assert [i for i, _ in done] == [1, 2]
    assert abs(done[0][1] - 3.0) < 0.05 and abs(done[1][1] - 4.0) < 0.05
