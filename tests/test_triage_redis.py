"""Two replicas with STATE_BACKEND=redis share the Wikidata cache and the one-request-at-a-
time rule (subprocesses: the triage world and two `processor run`, real Redis)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import httpx
import pytest

PY = sys.executable


@pytest.fixture
def world():
    proc = subprocess.Popen([PY, "-m", "processor.sandbox.world", "--claims", "0", "--wikidata-latency", "0.05"],
                            stdout=subprocess.PIPE, text=True, cwd="/")
    env: dict[str, str] = {}
    assert proc.stdout is not None
    deadline = time.time() + 30
    while time.time() < deadline and "WIKIDATA_API_URL" not in env:
        line = proc.stdout.readline().strip()
        if "=" in line:
            k, _, v = line.partition("=")
            env[k] = v
    assert "WIKIDATA_API_URL" in env
    yield env
    proc.terminate()
    proc.wait(timeout=10)


def redis_keys(pattern: str, *, delete: bool = False) -> list[str]:
    import coredis
    import trio

    async def go() -> list[str]:
        client = coredis.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
        async with client:
            keys = list(await client.keys(pattern))
            if delete and keys:
                await client.delete(keys)
            return keys

    return trio.run(go)


@pytest.mark.slow
def test_replicas_share_the_wikidata_cache_and_turn(world, tmp_path):
    prefix = f"triage-{secrets.token_hex(4)}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OLLAMA_", "WIKIDATA_", "API_", "OAUTH2_"))}
    env = {**base, **world, "PROCESSING_MODE": "openai", "OPENAI_API_KEY": "sk-test", "STATE_BACKEND": "redis",
           "REDIS_URL": "redis://127.0.0.1:6379/0", "REDIS_KEY_PREFIX": prefix, "RATE_LIMIT_ENABLED": "false",
           "POLLING_INTERVAL_SECONDS": "0.3", "METRICS_HOST": "127.0.0.1", "METRICS_PORT": "0", "LOG_LEVEL": "WARNING",
           "WIKIDATA_CONTACT": "tests@example.org"}
    api = world["API_BASE_URL"]
    httpx.post(f"{api}/_chain/seed", json={"claims": 20}).raise_for_status()
    procs = [subprocess.Popen([PY, "-m", "processor", "run"], env={**env, "STATE_DIR": str(tmp_path / f"r{i}")}, cwd="/",
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.time() + 120
        summary = {}
        while time.time() < deadline:
            summary = httpx.get(f"{api}/_chain/summary").json()
            if summary["complete"] >= 20:
                break
            time.sleep(0.5)
        assert summary["complete"] == 20 and not summary["refused"], summary
        assert summary["wikidata"]["max_in_flight"] == 1  # one request at a time across both replicas
        keys = redis_keys(f"{prefix}:wikidata:search:*")
        assert keys  # the cache lives in Redis, shared
        searches = summary["wikidata"]["requests"].get("wbsearchentities", 0)
        assert searches == len(keys)  # every name searched once, whichever replica asked first
        assert not list(tmp_path.glob("r*/wikidata.db"))  # no private cache files
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
        redis_keys(f"{prefix}:*", delete=True)
