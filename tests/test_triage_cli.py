"""`check` tries the chat model of every triage type (subprocesses, as a user runs it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

PY = [sys.executable, "-m", "processor"]


def run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OAUTH2_", "OPENAI_", "API_", "PROCESSING_", "ORY_", "OLLAMA_"))}
    return subprocess.run([*PY, *args], env={**base, **env}, capture_output=True, text=True, timeout=timeout, cwd="/")


@pytest.fixture
def world():
    proc = subprocess.Popen([sys.executable, "-m", "processor.sandbox.world", "--claims", "0"], stdout=subprocess.PIPE, text=True, cwd="/")
    env: dict[str, str] = {}
    deadline = time.time() + 30
    assert proc.stdout is not None
    while time.time() < deadline and "WIKIDATA_API_URL" not in env:
        line = proc.stdout.readline().strip()
        if "=" in line:
            k, _, v = line.partition("=")
            env[k] = v
    assert "WIKIDATA_API_URL" in env, "world did not start"
    yield env
    proc.terminate()
    proc.wait(timeout=10)


def test_check_asks_the_chat_model_of_each_type(world):
    r = run("check", env={**world, "PROCESSING_MODE": "openai", "OPENAI_API_KEY": "sk-test"})
    assert r.returncode == 0, r.stdout + r.stderr
    for t in ("identifying_data", "defining_topics", "defining_impact_area", "defining_severity"):
        assert f"{t} chat model: OK" in r.stdout and f"template {t}/1" in r.stdout
    r = run("check", env={**world, "PROCESSING_MODE": "mock", "TASK_TYPES": "text_embedding,defining_severity"})
    assert r.returncode == 0 and "defining_severity chat model: OK" in r.stdout and "identifying_data" not in r.stdout


def test_check_fails_on_a_chat_model_ollama_cannot_serve(world):
    chat = world["OLLAMA_BASE_URL"]
    httpx.post(f"{chat}/_fake/config", json={"pullable": []}).raise_for_status()
    env = {**world, "PROCESSING_MODE": "ollama", "SUPPORTED_MODELS": "qwen3:4b", "DEFAULT_MODEL": "qwen3:4b"}
    r = run("check", env=env)  # the platform's o3 is not an Ollama model and no MODEL_MAP sends it elsewhere
    assert r.returncode == 1 and "identifying_data chat model: FAIL" in r.stdout and "o3" in r.stdout
    r = run("check", env={**env, "MODEL_MAP": "o3=qwen3:4b"})
    assert "identifying_data chat model: OK" in r.stdout, r.stdout


def test_demo_prints_the_chain_per_claim():
    r = run("demo", "--tasks", "10", "--claims", "2", env={}, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "claim 1:" in out and "claim 2:" in out and "chain summary: 2/2 claims complete" in out
    people = [line for line in out.splitlines() if line.strip().startswith("people")]
    assert len(people) == 2 and all("(Q" in line for line in people), people
    for field in ("topics", "impact area", "severity"):
        assert sum(1 for line in out.splitlines() if line.strip().startswith(field)) == 2
    assert "results refused 0" in out
