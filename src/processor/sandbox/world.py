"""The triage world on loopback: the sandbox task API playing the platform's chain, a fake
model server (OpenAI and Ollama: chat and embeddings) and a fake Wikidata, in one process.

    python -m processor.sandbox.world --claims 100 --chat-latency 0.8 --wikidata-latency 0.15

prints the settings that point a processor at it. `GET /_chain/summary` on the task API's
port reports the chain (targets complete, results accepted and refused); the fakes answer
`/_fake/stats` and `/_fake/config` on their own ports.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import attrs
import orjson
import trio

from processor.effects.asgi import serve_asgi
from processor.sandbox.app import SandboxApp, SandboxState
from processor.sandbox.chain import Chain
from processor.sandbox.fake_backends import FakeBackendState, FakeEmbeddings
from processor.sandbox.fake_chat import FakeChat, FakeChatState
from processor.sandbox.fake_wikidata import FakeWikidata, FakeWikidataState


@attrs.define
class World:
    sandbox: SandboxState
    chain: Chain
    chat: FakeChatState
    wikidata: FakeWikidataState
    embeddings: FakeBackendState = attrs.field(factory=lambda: FakeBackendState(base=0.005, per_input=0.0005))
    urls: dict[str, str] = attrs.field(factory=dict)

    def env(self) -> dict[str, str]:
        """Settings that point a processor at this world."""
        api, chat, wiki = self.urls["api"], self.urls["chat"], self.urls["wikidata"]
        return {
            "API_BASE_URL": api, "OAUTH2_TOKEN_URL": f"{api}/oauth2/token",
            "OAUTH2_CLIENT_ID": self.sandbox.client_id, "OAUTH2_CLIENT_SECRET": self.sandbox.client_secret,
            "OPENAI_BASE_URL": chat, "OLLAMA_BASE_URL": chat, "WIKIDATA_API_URL": f"{wiki}/w/api.php",
        }


class Backends:
    """Chat and embeddings on one port, as one OpenAI account or one Ollama server serves
    both: `/v1/embeddings` and `/api/embed` go to the embedding fake, the rest to the chat
    fake (which also answers `/api/tags`, `/api/show`, `/api/pull`)."""

    def __init__(self, chat: FakeChatState, embeddings: FakeBackendState) -> None:
        self.chat = FakeChat(chat)
        self.embeddings = FakeEmbeddings(embeddings)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in ("/v1/embeddings", "/api/embed"):
            await self.embeddings(scope, receive, send)
        else:
            await self.chat(scope, receive, send)


class ChainApp:
    """The sandbox app, plus `/_chain/summary` and `/_chain/seed`."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.inner = SandboxApp(world.sandbox)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/_chain/"):
            body = b""
            while True:
                msg = await receive()
                body += msg.get("body", b"")
                if not msg.get("more_body"):
                    break
            if scope["path"] == "/_chain/seed":
                req = orjson.loads(body) if body else {}
                self.world.chain.seed(int(req.get("claims", 1)), start=len(self.world.chain.targets))
            payload = orjson.dumps({**self.world.chain.summary(), "states": dict(self.world.sandbox.by_state()),
                                    "chat": self.world.chat.stats(), "wikidata": self.world.wikidata.stats()})
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": payload})
            return
        await self.inner(scope, receive, send)


def make_world(*, claims: int = 0, chat_latency: float = 0.0, wikidata_latency: float = 0.0, bad_rate: float = 0.0,
               chat_model: str = "o3") -> World:
    sandbox = SandboxState()
    world = World(sandbox, Chain(sandbox, chat_model=chat_model), FakeChatState(latency=chat_latency, bad_rate=bad_rate),
                  FakeWikidataState(latency=wikidata_latency))
    if claims:
        world.chain.seed(claims)
    return world


async def serve_world(world: World, host: str, *, shutdown: trio.Event, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as n:
        for name, app in (("api", ChainApp(world)), ("chat", Backends(world.chat, world.embeddings)),
                          ("wikidata", FakeWikidata(world.wikidata))):
            world.urls[name] = await n.start(functools.partial(serve_asgi, app, host, 0, shutdown=shutdown))
        task_status.started(world)


def main() -> None:  # pragma: no cover - a development tool
    p = argparse.ArgumentParser(prog="python -m processor.sandbox.world", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--claims", type=int, default=10)
    p.add_argument("--chat-latency", type=float, default=0.0, help="seconds per chat answer")
    p.add_argument("--wikidata-latency", type=float, default=0.0, help="seconds per Wikidata request")
    p.add_argument("--bad-rate", type=float, default=0.0, help="share of chat answers that are bad")
    args = p.parse_args()
    world = make_world(claims=args.claims, chat_latency=args.chat_latency, wikidata_latency=args.wikidata_latency,
                       bad_rate=args.bad_rate)

    async def run() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as n:
            await n.start(functools.partial(serve_world, world, args.host, shutdown=stop))
            print(f"triage world listening on {world.urls['api']}", flush=True)
            for k, v in world.env().items():
                print(f"  {k}={v}", flush=True)
            with trio.open_signal_receiver(2, 15) as signals:
                async for _ in signals:
                    stop.set()
                    break

    trio.run(run)


if __name__ == "__main__":  # pragma: no cover
    main()
