"""What an operator sees: /metrics, /health, /ready and the logs (no secrets anywhere)."""

from __future__ import annotations

import io
import re

import httpx
import respx
import trio

from processor.daemon import Daemon
from processor.effects.logs import Redactor, configure_logging
from processor.pure.tasks import Backend
from processor.sandbox import Fault
from tests.conftest import CountingBackend, all_done, make_settings, running, wait_until

KEPT_NAMES = [
    "ai_tasks_processed_total", "ai_task_processing_duration_seconds", "ai_tasks_in_flight", "api_requests_total",
    "api_request_duration_seconds", "openai_requests_total", "openai_tokens_used_total", "ollama_requests_total",
    "ollama_tokens_used_total", "circuit_breaker_state", "rate_limit_current_usage", "rate_limit_max_allowed",
    "rate_limit_remaining", "rate_limit_exceeded_total", "rate_limit_check_duration_seconds",
]
ADDED_NAMES = [
    "oauth2_token_fetches_total", "embedding_batch_size", "processor_channel_depth", "ai_tasks_pending_backlog",
    "ai_task_pickup_age_seconds", "ai_task_end_to_end_seconds", "processor_retries_total", "processor_outbox_size",
    "processor_outbox_oldest_age_seconds", "ai_tasks_rejected_total", "processor_build_info",
]


async def test_metrics_health_and_ready(sandbox, tmp_path):
    sandbox.state.seed(60)
    sandbox.state.seed_malformed()
    settings = make_settings(sandbox, tmp_path, RATE_LIMIT_ENABLED="true", RATE_LIMIT_PER_HOUR="1000", RATE_LIMIT_PER_DAY="5000")
    daemon = Daemon(settings, backends={Backend.MOCK: CountingBackend()})
    async with running(daemon), httpx.AsyncClient(base_url=daemon.health_url) as c:
        await wait_until(all_done(sandbox.state, 65))
        await wait_until(lambda: daemon.not_ready_reasons() == [] and daemon.pipeline.book.outbox_size == 0)
        ready = await c.get("/ready")
        health = await c.get("/health")
        metrics = (await c.get("/metrics")).text
        assert (await c.get("/nope")).status_code == 404
    assert ready.status_code == 200 and ready.json() == {"ready": True, "reasons": []}
    h = health.json()
    assert health.status_code == 200 and h["status"] == "ok" and h["token"]["obtained"] is True
    assert set(h["breakers"]) == {"task_api", "token_endpoint", "mock"} and h["breakers"]["task_api"] == "closed"
    assert {t["period"] for t in h["rate_limits"]} == {"hour", "day"}
    hour = next(t for t in h["rate_limits"] if t["period"] == "hour")
    assert hour["used"] == 61 and hour["limit"] == 1000 and hour["remaining"] == 939 and hour["resets_at"]
    assert h["outbox_size"] == 0 and h["state_store"]["writable"] is True
    for name in KEPT_NAMES + ADDED_NAMES:
        assert f"# TYPE {name}" in metrics or f"# TYPE {name.removesuffix('_total')}" in metrics, name
    assert 'ai_tasks_processed_total{status="succeeded",task_type="text_embedding"} 61.0' in metrics
    assert 'rate_limit_current_usage{period="hour"} 61.0' in metrics
    for stage in ("taken", "claimed", "computed"):
        assert f'processor_stage_tasks_total{{stage="{stage}"}} 61.0' in metrics, stage
    assert 'processor_stage_tasks_total{stage="reported"} 65.0' in metrics  # + 4 rejections reported failed
    # label cardinality stays bounded: endpoints are templates, never ids
    endpoints = set(re.findall(r'endpoint="([^"]*)"', metrics))
    assert endpoints <= {"/api/ai-tasks/pending", "/api/ai-tasks/:id", "/api/ai-tasks"}
    assert not re.search(r'="[0-9a-f]{24}"', metrics)


async def test_ready_is_503_with_reasons_before_the_api_answers_and_while_stopping(sandbox, tmp_path):
    sandbox.state.faults["*"] = Fault(status=503)
    settings = make_settings(sandbox, tmp_path)
    daemon = Daemon(settings, backends={Backend.MOCK: CountingBackend()})
    async with running(daemon), httpx.AsyncClient(base_url=daemon.health_url) as c:
        r = await c.get("/ready")
        assert r.status_code == 503 and any("token" in x for x in r.json()["reasons"])
        del sandbox.state.faults["*"]
        await wait_until(lambda: daemon.not_ready_reasons() == [])
        daemon.stop()
        await trio.sleep(0)
        r = await c.get("/ready")
        assert r.status_code == 503 and "shutting down" in r.json()["reasons"]


OPENAI = "http://openai.test"
CLIENT_SECRET = "CLIENTSECRET-do-not-log-4f9a"
API_KEY = "sk-APIKEYSECRET-do-not-log-77aa"


@respx.mock
async def test_no_secret_is_ever_logged_or_exposed(sandbox, tmp_path):
    """An end-to-end run at DEBUG with recognisable secrets, token revocation, a rejected
    secret and a rejected API key: the whole log, /health and /metrics hold none of them."""
    respx.route(host="127.0.0.1").pass_through()  # the sandbox and the daemon's own endpoints
    calls = {"n": 0}

    def openai(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:  # echoes the key back, as some proxies do in their errors
            return httpx.Response(401, json={"error": {"message": f"Incorrect API key provided: {API_KEY}", "type": "x", "code": "invalid_api_key"}})
        import json as _json

        from tests.test_backends import openai_ok
        assert _json.loads(request.content)
        return openai_ok(request)

    respx.post(f"{OPENAI}/v1/embeddings").mock(side_effect=openai)
    sandbox.state.client_secret = CLIENT_SECRET
    sandbox.state.seed(40, model="text-embedding-3-small")
    buf = io.StringIO()
    configure_logging("DEBUG", "json", stream=buf)
    try:
        settings = make_settings(sandbox, tmp_path, PROCESSING_MODE="openai", OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=OPENAI,
                                 REDIS_URL="redis://user:REDISPASS-do-not-log@127.0.0.1:6379/0")
        daemon = Daemon(settings)
        async with running(daemon), httpx.AsyncClient(base_url=daemon.health_url) as c:
            await wait_until(lambda: sandbox.state.by_state().get("succeeded", 0) >= 5)
            issued = list(sandbox.state.tokens)  # revoking forgets them: keep them for the scan
            sandbox.state.revoke_all()
            sandbox.state.client_secret = "rotated"
            # the next request (a claim, a report or the next poll) needs a new token, refused
            await wait_until(lambda: "token_request_failed" in buf.getvalue())
            sandbox.state.client_secret = CLIENT_SECRET
            await wait_until(all_done(sandbox.state, 40))
            exposed = (await c.get("/health")).text + (await c.get("/metrics")).text + (await c.get("/ready")).text
    finally:
        configure_logging("WARNING", "json")
    logged = buf.getvalue()
    assert "token_request_failed" in logged and "task_rejected" not in logged  # the scenario happened
    tokens = issued + list(sandbox.state.tokens)
    assert tokens
    for secret in [CLIENT_SECRET, API_KEY, "REDISPASS-do-not-log", *tokens]:
        assert secret not in logged, secret
        assert secret not in exposed, secret


def test_redactor_patterns():
    r = Redactor()
    r.add("s3cr3t-value")
    text = r.redact("Authorization: Bearer abc.def.ghi; Basic dXNlcjpwYXNzd29yZA==; key sk-abcdefghijklmnop; "
                    "client_secret=hunter2&x=1; redis://u:pw@h:1/0; also s3cr3t-value")
    for leaked in ("abc.def.ghi", "dXNlcjpwYXNzd29yZA==", "sk-abcdefghijklmnop", "hunter2", ":pw@", "s3cr3t-value"):
        assert leaked not in text
    assert r.redact("nothing to hide here") == "nothing to hide here"
