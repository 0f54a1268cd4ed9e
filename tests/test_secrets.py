"""Secrets stay out of world-readable files and out of /health and /ready (issue 11)."""

from __future__ import annotations

import os
import stat

import httpx
import orjson
import trio

from processor.daemon import Daemon
from processor.effects.asgi import serve_asgi
from processor.effects.health import MAX_TEXT, HealthApp
from processor.effects.logs import REDACTOR
from processor.effects.metrics import Metrics
from processor.pure.tasks import Backend
from processor.sandbox.app import TokenAnswer
from tests.conftest import CountingBackend, all_done, make_settings, running, wait_until


def modes(root) -> dict[str, int]:
    out = {}
    for base, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = os.path.join(base, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    return out


async def test_state_files_are_private_after_a_real_run(sandbox, tmp_path):
    sb = sandbox
    sb.state.seed(20)
    settings = make_settings(sb, tmp_path, RATE_LIMIT_ENABLED="true", RATE_LIMIT_PER_MINUTE="1000",
                             OPENAI_RATE_LIMIT_PER_MINUTE="1000")
    daemon = Daemon(settings, backends={Backend.MOCK: CountingBackend()})
    async with running(daemon):
        await wait_until(all_done(sb.state, 20))
        during = modes(tmp_path / "state")
    after = modes(tmp_path / "state")
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    names = set(during) | set(after)
    assert {"journal.db", "rate_limits.db"} <= names and any(n.endswith("-wal") for n in during)
    for name, mode in [*during.items(), *after.items()]:
        assert mode & 0o077 == 0, (name, oct(mode))


async def test_state_files_left_world_readable_are_fixed_at_open(sandbox, tmp_path):
    sb = sandbox
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    settings = make_settings(sb, tmp_path, RATE_LIMIT_ENABLED="true", RATE_LIMIT_PER_MINUTE="1000")
    for name in ("journal.db", "journal.db-wal", "rate_limits.db"):
        (state / name).write_bytes(b"")
        os.chmod(state / name, 0o644)
    sb.state.seed(3)
    daemon = Daemon(settings, backends={Backend.MOCK: CountingBackend()})
    async with running(daemon):
        await wait_until(all_done(sb.state, 3))
    for name, mode in modes(state).items():
        assert mode & 0o077 == 0, (name, oct(mode))


async def test_health_never_shows_an_echoed_secret_and_bounds_error_texts(sandbox, tmp_path):
    """The token endpoint echoes the client secret in its error: /health must not."""
    sb = sandbox
    secret = sb.state.client_secret = "s3cr3t-value-that-must-not-leak"
    echo = orjson.dumps({"error": f"invalid_client: we got {secret} " + "x" * 5000, "error_description": secret})
    sb.state.token_answer = TokenAnswer(raw=echo, status=400)
    daemon = Daemon(make_settings(sb, tmp_path, OAUTH2_CLIENT_SECRET=secret), backends={Backend.MOCK: CountingBackend()})
    async with running(daemon), httpx.AsyncClient(base_url=daemon.health_url) as c:
        await wait_until(lambda: sb.state.token_requests >= 1 and daemon.pipeline is not None and daemon.pipeline.tokens.last_error)
        health = await c.get("/health")
        ready = await c.get("/ready")
    for r in (health, ready):
        assert secret not in r.text
        walk_strings(r.json(), lambda s: len(s) <= MAX_TEXT)
    assert "invalid_client" in health.json()["token"]["last_error"]
    assert "[REDACTED]" in health.json()["token"]["last_error"]


def walk_strings(v, ok) -> None:
    if isinstance(v, str):
        assert ok(v), v[:80]
    elif isinstance(v, dict):
        for k, x in v.items():
            walk_strings(k, ok)
            walk_strings(x, ok)
    elif isinstance(v, list):
        for x in v:
            walk_strings(x, ok)


async def test_ready_reasons_from_peers_are_redacted_and_bounded():
    """Backend error texts reach /ready verbatim from the daemon; the endpoint cleans them."""
    key = "sk-live-" + "k" * 40
    REDACTOR.add(key)
    reasons = [f"openai backend circuit breaker open: 401 Incorrect API key provided: {key}" + "y" * 2000,
               "a lone \udc00 surrogate from a peer", "Bearer abc.def.ghi in a message"]
    app = HealthApp(Metrics().registry, lambda: {"backend": {"error": reasons[0], "n": 3}}, lambda: reasons)
    stop = trio.Event()
    async with trio.open_nursery() as n:
        url = await n.start(lambda task_status: serve_asgi(app, "127.0.0.1", 0, shutdown=stop, task_status=task_status))
        async with httpx.AsyncClient(base_url=url) as c:
            health, ready = await c.get("/health"), await c.get("/ready")
        stop.set()
    assert ready.status_code == 503 and health.status_code == 200
    for r in (health, ready):
        assert key not in r.text and "abc.def.ghi" not in r.text
        walk_strings(r.json(), lambda s: len(s) <= MAX_TEXT)
    assert health.json()["backend"]["n"] == 3
    assert "surrogate" in ready.json()["reasons"][1]


def test_a_log_line_never_raises_whatever_a_peer_sent():
    """Texts and values from peers reach log events: surrogates, integers beyond 64 bits,
    deep nesting, objects. Each event still becomes one JSON line; the caller never sees an
    exception from logging."""
    import io

    from processor.effects.logs import configure_logging, get_logger

    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    try:
        log = get_logger("test")
        deep: list = []
        for _ in range(5000):
            deep = [deep]
        log.warning("surrogate", error="backend said \udc00 and \ud800x", nested={"k": ["\udfff"]})
        log.warning("bigint", value=2**70, huge=10**5000)
        log.warning("deep", value=deep)
        log.warning("object", value=object())
    finally:
        configure_logging("WARNING", "json")
    lines = out.getvalue().splitlines()
    assert [orjson.loads(line)["event"] for line in lines] == ["surrogate", "bigint", "deep", "object"]
    assert "\\udc00" in orjson.loads(lines[0])["error"]
