"""A local stand-in for Wikidata's `api.php` (CONTRACT.md §8): `wbsearchentities` and
`wbgetentities`, with latency, `down`/`slow`/`maxlag` modes and request counters.

Every name has two candidates, in this order: a disambiguation page (not a human) and an
item that is a human when the name looks like a person's (two or more capitalised words),
else a concept. So a client that takes the first search result for a person is caught.
The fake checks the etiquette: a request without a `User-Agent` or without `maxlag` is
answered with an error, more than 50 ids is an error, and the highest number of requests
it saw at the same time is kept (`max_in_flight`: one client following the rules keeps it
at 1).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

import attrs
import orjson
import trio

from processor.effects.asgi import lifespan


def qid(name: str, n: int) -> str:
    h = int.from_bytes(hashlib.sha256(f"{' '.join(name.split()).casefold()}|{n}".encode()).digest()[:4], "big")
    return f"Q{h % 90_000_000 + 1_000_000}"


def looks_like_person(name: str) -> bool:
    words = name.split()
    return len(words) >= 2 and sum(w[:1].isupper() for w in words) >= 2


@attrs.define
class FakeWikidataState:
    latency: float = 0.0
    mode: str = "ok"  # ok | down (500) | slow (sleep `slow_seconds`) | maxlag (the next `maxlag_count` requests)
    slow_seconds: float = 30.0
    maxlag_count: int = 0
    maxlag_retry_after: int = 1
    requests: Counter[str] = attrs.field(factory=Counter)  # by action
    ids_requested: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    user_agents: set[str] = attrs.field(factory=set)
    items: dict[str, tuple[str, str, bool]] = attrs.field(factory=dict)  # qid -> (label, description, human)

    def stats(self) -> dict[str, Any]:
        return {"requests": dict(self.requests), "total": sum(self.requests.values()), "ids_requested": self.ids_requested,
                "max_in_flight": self.max_in_flight, "user_agents": sorted(self.user_agents), "mode": self.mode}


class FakeWikidata:
    def __init__(self, state: FakeWikidataState | None = None) -> None:
        self.state = state or FakeWikidataState()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        st = self.state
        path = scope["path"]
        if path == "/_fake/config":
            for key, value in (orjson.loads(body) if body else {}).items():
                setattr(st, key, value)
            await _reply(send, 200, st.stats())
            return
        if path == "/_fake/stats":
            await _reply(send, 200, st.stats())
            return
        if path != "/w/api.php":
            await _reply(send, 404, {"error": "not found"})
            return
        query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        action = query.get("action", "?")
        st.requests[action] += 1
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            await self._handle(send, st, query, headers, action)
        finally:
            st.in_flight -= 1

    async def _handle(self, send: Any, st: FakeWikidataState, query: dict[str, str], headers: dict[str, str], action: str) -> None:
        if st.latency:
            await trio.sleep(st.latency)
        if st.mode == "slow":
            await trio.sleep(st.slow_seconds)
        if st.mode == "down":
            await _reply(send, 500, {"error": {"code": "internal_api_error", "info": "injected"}})
            return
        ua = headers.get("user-agent", "")
        st.user_agents.add(ua)
        if not ua or ua.startswith("python-httpx"):
            await _reply(send, 403, {"error": {"code": "blocked", "info": "Please set a descriptive User-Agent with a contact"}})
            return
        if query.get("maxlag") != "5":
            await _reply(send, 200, {"error": {"code": "badvalue", "info": "this fake wants maxlag=5 on every request"}})
            return
        if st.mode == "maxlag" and st.maxlag_count > 0:
            st.maxlag_count -= 1
            await _reply(send, 200, {"error": {"code": "maxlag", "info": "Waiting for a database server: 6 seconds lagged.", "lag": 6}},
                         extra=[(b"retry-after", str(st.maxlag_retry_after).encode()), (b"x-database-lag", b"6")])
            return
        if action == "wbsearchentities":
            await _reply(send, 200, self._search(query.get("search", ""), query.get("language", "en")))
        elif action == "wbgetentities":
            ids = [i for i in query.get("ids", "").split("|") if i]
            if len(ids) > 50:
                await _reply(send, 200, {"error": {"code": "too-many", "info": "Too many values supplied for parameter \"ids\". The limit is 50."}})
                return
            st.ids_requested += len(ids)
            await _reply(send, 200, self._entities(ids, query.get("languages", "en").split("|")[0]))
        else:
            await _reply(send, 200, {"error": {"code": "badvalue", "info": f"unknown action {action}"}})

    def _search(self, name: str, language: str) -> dict[str, Any]:
        if not name.strip():
            return {"search": []}
        first, second = qid(name, 0), qid(name, 1)
        self.state.items[first] = (name, "página de desambiguação", False)
        person = looks_like_person(name)
        self.state.items[second] = (name, "político brasileiro" if person else "conceito", person)
        return {"searchinfo": {"search": name}, "search": [
            {"id": i, "title": i, "label": self.state.items[i][0], "description": self.state.items[i][1],
             "match": {"type": "label", "language": language, "text": name}} for i in (first, second)
        ], "success": 1}

    def _entities(self, ids: list[str], language: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i in ids:
            item = self.state.items.get(i)
            if item is None:
                out[i] = {"id": i, "missing": ""}
                continue
            label, description, human = item
            claims = {"P31": [{"mainsnak": {"snaktype": "value", "property": "P31",
                                            "datavalue": {"value": {"entity-type": "item", "id": "Q5" if human else "Q4167410"},
                                                          "type": "wikibase-entityid"}}, "rank": "normal"}]}
            out[i] = {"type": "item", "id": i, "labels": {language: {"language": language, "value": label}},
                      "descriptions": {language: {"language": language, "value": description}}, "claims": claims}
        return {"entities": out, "success": 1}


async def _reply(send: Any, status: int, payload: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    data = orjson.dumps(payload)
    headers = [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(data)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
