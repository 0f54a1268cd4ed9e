"""Drive the daemon from outside: a real `python -m processor run` process against the
sandbox task API and a fake embedding server, both served from this test process on
loopback, talking HTTP only. Nothing here imports the daemon's own code, so the same tests
run against any tree:

    HOSTILE_DAEMON_SRC=/work/wt/a6a26dd/src python -m pytest tests/hostile

runs the daemon from that tree's `src` (PYTHONPATH of the daemon process only) while the
sandbox, the fake servers and the checks come from this one.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import trio

from processor.sandbox import SandboxApp, SandboxState, serve_asgi
from processor.sandbox.fake_backends import FakeBackendState, FakeEmbeddings, expected_vector

DAEMON_SRC = os.environ.get("HOSTILE_DAEMON_SRC")  # run the daemon from another tree's src
LOCAL_MODEL = "nomic-embed-text"
REMOTE_MODEL = "text-embedding-3-small"
OLLAMA_DIM = 768
OPENAI_DIM = 1024

# Recognisable secrets: any of them in a log line, /health or /metrics is a leak.
CLIENT_SECRET = "hostile-client-secret-7c1d9e3fa2b84d06"
API_KEY = "sk-hostile-apikey-5e8b2c7d1f9a4e3b6c0d"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define
class Offered:
    """A task put in the pending list, and what it may become.

    expect: `succeed` (a valid task: must end succeeded with its vector), `defect` (its own
    content is bad: failed with a reason naming one of `words`, or pending), `stay` (cannot
    or must not be processed here: must stay pending, e.g. an unreportable id, a type or a
    model this deployment does not serve).
    """

    key: str
    expect: str
    text: str | None = None
    model: str | None = None
    words: tuple[str, ...] = ()
    note: str = ""


@attrs.define
class Daemon:
    proc: subprocess.Popen[bytes]
    log_path: Path
    health_url: str
    env: dict[str, str]
    started_at: float
    ended_by_test: bool = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 4000) -> str:
        return self.log_text()[-n:]

    async def get(self, path: str) -> httpx.Response | None:
        try:
            async with httpx.AsyncClient(timeout=5) as c:
                return await c.get(self.health_url + path)
        except httpx.HTTPError:
            return None

    def kill(self) -> None:
        self.ended_by_test = True
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.ended_by_test = True
        if self.alive():
            self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int | None:
        with trio.move_on_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(0.05)
        return self.proc.poll()

    async def stop(self, timeout: float = 15.0) -> int | None:
        self.signal(signal.SIGTERM)
        code = await self.wait_exit(timeout)
        if code is None:
            self.proc.kill()
            self.proc.wait()
        return code


@attrs.define
class World:
    sandbox: SandboxState
    url: str
    fake: FakeBackendState
    fake_url: str
    tmp: Path
    offered: list[Offered] = attrs.field(factory=list)
    daemons: list[Daemon] = attrs.field(factory=list)

    # -- the daemon ----------------------------------------------------------------------
    def env(self, mode: str = "ollama", *, minimal: bool = False, **extra: Any) -> dict[str, str]:
        """The daemon's environment. `minimal`: only where the peers and the state are (and
        loopback for /metrics); every other setting at its default."""
        env = {
            "API_BASE_URL": self.url,
            "OAUTH2_TOKEN_URL": f"{self.url}/oauth2/token",
            "OAUTH2_CLIENT_ID": self.sandbox.client_id,
            "OAUTH2_CLIENT_SECRET": self.sandbox.client_secret,
            "PROCESSING_MODE": mode,
            "POLLING_INTERVAL_SECONDS": "0.3",
            "STATE_DIR": str(self.tmp / "state"),
            "METRICS_HOST": "127.0.0.1",
            "RATE_LIMIT_ENABLED": "false",
            "SHUTDOWN_GRACE_SECONDS": "5",
            "RETRY_MAX_DELAY_SECONDS": "1",
            "LOG_LEVEL": "DEBUG",
            "LOG_FORMAT": "json",
            "OLLAMA_BASE_URL": self.fake_url,
            "SUPPORTED_MODELS": LOCAL_MODEL,
        }
        if minimal:
            for k in ("POLLING_INTERVAL_SECONDS", "RATE_LIMIT_ENABLED", "SHUTDOWN_GRACE_SECONDS", "RETRY_MAX_DELAY_SECONDS", "LOG_LEVEL"):
                del env[k]
        if mode in ("openai", "hybrid"):
            env.update(OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=self.fake_url)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    async def start(self, mode: str = "ollama", *, wait_started: bool = True, minimal: bool = False, **extra: Any) -> Daemon:
        port = free_port()
        env = {**self.env(mode, minimal=minimal, **extra), "METRICS_PORT": str(port)}
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
        if DAEMON_SRC:
            base["PYTHONPATH"] = DAEMON_SRC
        elif "PYTHONPATH" in os.environ:
            base["PYTHONPATH"] = os.environ["PYTHONPATH"]
        log_path = self.tmp / f"daemon-{len(self.daemons)}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - the child writes it; read back by the checks
        proc = subprocess.Popen([sys.executable, "-m", "processor", "run"], env={**base, **env}, stdout=log, stderr=log,
                                cwd=str(self.tmp))
        log.close()
        d = Daemon(proc, log_path, f"http://127.0.0.1:{port}", env, time.monotonic())
        self.daemons.append(d)
        if wait_started:
            await self.wait_health(d)
        return d

    async def wait_health(self, d: Daemon, timeout: float = 30.0) -> None:
        with trio.move_on_after(timeout):
            while d.alive():
                r = await d.get("/health")
                if r is not None and r.status_code == 200:
                    return
                await trio.sleep(0.1)
        if not d.alive():
            return  # the checks report it
        raise AssertionError(f"daemon never answered /health\n{d.tail()}")

    # -- the world -----------------------------------------------------------------------
    def offer_valid(self, n: int, *, model: str | None = LOCAL_MODEL, text_size: int = 40, prefix: str = "claim") -> list[Offered]:
        out = []
        for i in range(n):
            text = (f"{prefix} {i} {len(self.offered)}: " + "lorem ipsum dolor sit amet " * (text_size // 27 + 1))[:text_size]
            content: Any = {"text": text, "model": model} if model else text
            tid = self.sandbox.create({"type": "text_embedding", "content": content})["_id"]
            o = Offered(tid, "succeed", text, model or LOCAL_MODEL)
            self.offered.append(o)
            out.append(o)
        return out

    def offer_raw(self, raw: bytes, *, key: str | None, expect: str, text: str | None = None, model: str | None = None,
                  words: Iterable[str] = (), note: str = "") -> Offered:
        k = self.sandbox.insert_raw_bytes(raw, key)
        o = Offered(k, expect, text, model, tuple(words), note)
        self.offered.append(o)
        return o

    def calm(self) -> None:
        self.sandbox.calm()
        self.fake.calm()

    def state_of(self, key: str) -> str | None:
        t = self.sandbox.tasks.get(key)
        return t.get("state") if isinstance(t, dict) else None

    def states(self) -> dict[str, int]:
        return dict(self.sandbox.by_state())

    def settled(self, *, require_success: bool = True) -> bool:
        """Nothing in progress, every task that must succeed has."""
        if self.sandbox.by_state().get("in_progress", 0):
            return False
        return not require_success or all(self.state_of(o.key) == "succeeded" for o in self.offered if o.expect == "succeed")

    async def wait_quiet(self, timeout: float = 120.0, quiet_for: float = 1.0, also: Callable[[], bool] | None = None,
                         polls: int = 2, require_success: bool = True) -> bool:
        """Wait until settled, `polls` more pending lists were served, and no PATCH came for
        `quiet_for` s (or a daemon died, or timeout). The timeout only turns a hang into a
        failure: generous, since the checks must hold on a busy machine too."""
        served = self.sandbox.requests[("pending", 200)] + polls
        with trio.move_on_after(timeout):
            while True:
                if any(not d.alive() and not d.ended_by_test for d in self.daemons):
                    return False
                last = self.sandbox.last_patch_at or 0.0
                if (self.settled(require_success=require_success) and time.time() - last >= quiet_for and self.sandbox.requests[("pending", 200)] >= served
                        and (also is None or also())):
                    return True
                await trio.sleep(0.1)
        return False

    # -- the properties --------------------------------------------------------------------
    def secrets(self) -> list[str]:
        return [s for s in {self.sandbox.client_secret, API_KEY, *self.sandbox.issued} if s and len(s) >= 6]

    def expected(self, o: Offered, openai: bool) -> list[float]:
        """The vector `o` must end with: OpenAI's in `openai` mode, and in hybrid mode for
        the OpenAI model (`REMOTE_MODEL`); Ollama's otherwise."""
        model = o.model or LOCAL_MODEL
        remote = openai or model == REMOTE_MODEL
        return expected_vector(model, o.text or "", OPENAI_DIM if remote else OLLAMA_DIM, openai=remote)

    async def violations(self, d: Daemon, *, openai: bool = False, limit: tuple[str, int, float] | None = None,
                         check_vectors: bool = True) -> list[str]:
        """Every property that does not hold once the world is quiet (empty: all hold)."""
        out: list[str] = []
        if not d.alive():
            out.append(f"daemon exited on its own (exit {d.proc.poll()}); log tail:\n{d.tail(3000)}")
        st = self.sandbox
        for o in self.offered:
            state = self.state_of(o.key)
            reason = st.reasons.get(o.key)
            if state == "in_progress":
                out.append(f"{o.key!r} ({o.note or o.expect}) left in_progress")
            elif o.expect == "succeed" and state != "succeeded":
                out.append(f"valid task {o.key} ({o.note}) ended {state}" + (f" with reason {reason!r}" if reason else ""))
            elif o.expect == "succeed" and check_vectors:
                got = st.tasks[o.key].get("result")
                want = self.expected(o, openai)
                if not (isinstance(got, list) and len(got) == len(want) and all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(got, want, strict=True))):
                    out.append(f"valid task {o.key} succeeded with a result that is not its text's vector")
            elif o.expect == "stay" and state != "pending":
                out.append(f"task {o.key!r} ({o.note}) must stay pending, ended {state}" + (f" ({reason!r})" if reason else ""))
            elif o.expect == "defect":
                if state == "succeeded":
                    out.append(f"defective task {o.key!r} ({o.note}) was reported succeeded")
                elif state == "failed" and (not reason or (o.words and not any(w in reason.lower() for w in o.words))):
                    out.append(f"defective task {o.key!r} ({o.note}) failed with reason {reason!r}, expected one naming {o.words}")
        conflicting = [k for k, s in st.callback_results.items() if len(s) > 1]
        if conflicting:
            out.append(f"{len(conflicting)} task(s) reported succeeded twice with different results: {conflicting[:3]}")
        if limit is not None:
            out += self.limit_overshoot(*limit)
        out += await self.leaks(d)
        return out

    def units(self) -> list[float]:
        """Claims that reached the backend, at their claim time: a unit spent each.

        A claim counts when the backend received its task's text after it and before the
        task's next claim (claims refused or released before any backend call are refunded)."""
        text_of = {o.text: o.key for o in self.offered if o.text}
        sent: dict[str, list[float]] = {}
        for at, text in self.fake.input_log:
            key = text_of.get(text)
            if key is not None:
                sent.setdefault(key, []).append(at)
        claims: dict[str, list[float]] = {}
        for p in self.sandbox.patches:
            if p.state == "in_progress":
                claims.setdefault(p.task_id, []).append(p.at)
        out = []
        for key, times in claims.items():
            times.sort()
            for i, c in enumerate(times):
                nxt = times[i + 1] if i + 1 < len(times) else math.inf
                if any(c <= s < nxt for s in sent.get(key, ())):
                    out.append(c)
        return sorted(out)

    def limit_overshoot(self, period: str, limit: int, seconds: float, slack: float = 0.5) -> list[str]:
        """Units in any window of `seconds - slack` (the slack covers claim latency after the
        reservation) must stay within `limit`."""
        times = self.units()
        span = seconds - slack
        worst = 0
        j = 0
        for i, t in enumerate(times):
            while times[j] < t - span:
                j += 1
            worst = max(worst, i - j + 1)
        return [f"{worst} units in one {period} window at a limit of {limit}"] if worst > limit else []

    async def leaks(self, d: Daemon) -> list[str]:
        out = []
        texts = {"logs": d.log_text()}
        for path in ("/health", "/ready", "/metrics"):
            r = await d.get(path)
            if r is not None:
                texts[path] = r.text
        for where, text in texts.items():
            for s in self.secrets():
                if s in text:
                    out.append(f"secret {s[:12]}... appears in {where}")
        return out


@asynccontextmanager
async def hostile_world(tmp: Path, *, fake: FakeBackendState | None = None, sandbox: SandboxState | None = None) -> AsyncIterator[World]:
    """The sandbox and a fake embedding server on loopback; every daemon started through the
    world is stopped (SIGTERM, then SIGKILL) on the way out."""
    st = sandbox or SandboxState(client_secret=CLIENT_SECRET)
    fk = fake or FakeBackendState(base=0.005, per_input=0.0005, dim=OLLAMA_DIM, serial=True)
    async with trio.open_nursery() as n:
        stop = trio.Event()
        url = await n.start(lambda task_status: serve_asgi(SandboxApp(st), "127.0.0.1", 0, shutdown=stop, task_status=task_status))
        fake_url = await n.start(lambda task_status: serve_asgi(FakeEmbeddings(fk), "127.0.0.1", 0, shutdown=stop, task_status=task_status))
        w = World(st, url, fk, fake_url, tmp)
        try:
            yield w
        finally:
            with trio.CancelScope(shield=True):
                for d in w.daemons:
                    if d.alive():
                        await d.stop(10)
            stop.set()


def json_raw(value: Any) -> bytes:
    """JSON text the way another program may write it: lone surrogates as \\u escapes,
    integers of any size, non-ASCII escaped. (orjson refuses the first two.)"""
    import json

    return json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def pending_entry(tid: Any, content: Any, **extra: Any) -> bytes:
    """A text_embedding entry of the pending list, as raw bytes."""
    return json_raw({"_id": tid, "type": "text_embedding", "state": "pending", "content": content, **extra})


async def assert_holds(world: World, d: Daemon, **kw: Any) -> None:
    """Every property of `World.violations` holds (else one line per violation)."""
    v = await world.violations(d, **kw)
    assert not v, "\n".join(v)


def event_names(log: str) -> list[str]:
    out = []
    for line in log.splitlines():
        try:
            ev = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(ev, dict) and isinstance(ev.get("event"), str):
            out.append(ev["event"])
    return out


def model_label_values(metrics_text: str) -> set[str]:
    return set(re.findall(r'model="([^"]*)"', metrics_text))
