"""Stand-in for OpenAI's and Ollama's embedding servers (the outside world), with a fault
switch: `python tests/deploy/fake_embedding_server.py --port P`, then
`POST /_fault {"openai": "quota" | "down" | "busy" | null, "ollama": "down" | "busy" | null}`.

Serves `processor.sandbox.fake_backends.FakeEmbeddings` (deterministic vectors, token
usage) and, while a fault is set, answers that backend's embedding calls with OpenAI's 429
`insufficient_quota` (quota), a 503 (busy: the server is up and asks for less), or breaks
the connection (down: what a crashed or unreachable server looks like to a client).
"""

from __future__ import annotations

import argparse
from typing import Any

import orjson
import trio

from processor.effects.asgi import serve_asgi
from processor.sandbox.fake_backends import FakeBackendState, FakeEmbeddings, _reply

QUOTA = {"error": {"message": "You exceeded your current quota, please check your plan and billing details.",
                   "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}


class FaultyEmbeddings:
    def __init__(self) -> None:
        self.inner = FakeEmbeddings(FakeBackendState(base=0.002, per_input=0.0002))
        self.faults: dict[str, str | None] = {"openai": None, "ollama": None}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        path = scope["path"]
        if path == "/_fault":
            body = b""
            while True:
                msg = await receive()
                body += msg.get("body", b"")
                if not msg.get("more_body"):
                    break
            self.faults.update(orjson.loads(body or b"{}"))
            await _reply(send, 200, self.faults)
            return
        which = "openai" if path.startswith("/v1/") else "ollama" if path == "/api/embed" else None
        fault = self.faults.get(which) if which else None
        if fault == "quota":
            await _reply(send, 429, QUOTA)
        elif fault == "busy":
            await _reply(send, 503, {"error": {"message": "injected: service unavailable", "type": "server_error"}})
        elif fault == "down":
            # hypercorn answers 500 for an app that fails before it starts a response: start
            # one, then break the connection (the sandbox's `drop` fault does the same).
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4096")]})
            await send({"type": "http.response.body", "body": b"{", "more_body": True})
            raise ConnectionAbortedError("injected: connection dropped")
        else:
            await self.inner(scope, receive, send)


async def main(port: int) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as n:
        url = await n.start(lambda task_status: serve_asgi(FaultyEmbeddings(), "127.0.0.1", port, shutdown=stop, task_status=task_status))
        print(f"fake embeddings listening on {url}", flush=True)
        with trio.open_signal_receiver(2, 15) as signals:
            async for _ in signals:
                stop.set()
                break


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    trio.run(main, p.parse_args().port)
