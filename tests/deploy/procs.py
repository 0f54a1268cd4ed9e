"""Real processes for the deployment tests: the sandbox task API, the daemon, a fake
embedding server, Prometheus. Each is started on a free loopback port, waited for by
polling (generous deadlines: CI is a busy 2-core machine), and stopped by its own pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.25) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


class Proc:
    def __init__(self, name: str, args: list[str], *, env: dict[str, str] | None = None, log: Path) -> None:
        self.name = name
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    def alive(self) -> bool:
        return self.p.poll() is None

    def log(self, tail: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int | None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=10)
        self._log.close()
        return self.p.returncode


def start_sandbox(tmp: Path, *, seed: int = 0) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc("sandbox", [sys.executable, "-m", "processor", "sandbox", "--port", str(port), "--seed", str(seed)], log=tmp / "sandbox.log")
    url = f"http://127.0.0.1:{port}"
    wait_for("the sandbox", lambda: fail_if_dead(proc) or httpx.get(f"{url}/_sandbox/stats", timeout=5).status_code == 200)
    return proc, url


def start_fake_embeddings(tmp: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc("fake-embeddings", [sys.executable, str(ROOT / "tests/deploy/fake_embedding_server.py"), "--port", str(port)],
                log=tmp / "fake_embeddings.log")
    url = f"http://127.0.0.1:{port}"
    wait_for("the fake embedding server", lambda: fail_if_dead(proc) or httpx.post(f"{url}/_fault", json={}, timeout=5).status_code == 200)
    return proc, url


def daemon_env(sandbox_url: str, state_dir: Path, metrics_port: int, **extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OLLAMA_", "RATE_LIMIT", "PROCESSING_", "EMBEDDING_"))}
    env.update({
        "API_BASE_URL": sandbox_url, "OAUTH2_TOKEN_URL": f"{sandbox_url}/oauth2/token",
        "OAUTH2_CLIENT_ID": "sandbox-client", "OAUTH2_CLIENT_SECRET": "sandbox-secret",
        "PROCESSING_MODE": "mock", "STATE_DIR": str(state_dir), "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": str(metrics_port), "POLLING_INTERVAL_SECONDS": "1", "RATE_LIMIT_ENABLED": "false",
        "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "SHUTDOWN_GRACE_SECONDS": "5",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_daemon(tmp: Path, env: dict[str, str], *, name: str = "daemon") -> Proc:
    proc = Proc(name, [sys.executable, "-m", "processor", "--env-file", os.devnull, "run"], env=env, log=tmp / f"{name}.log")
    port = env["METRICS_PORT"]
    wait_for(f"{name}'s /health", lambda: fail_if_dead(proc) or httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200,
             timeout=90)
    return proc


def fail_if_dead(proc: Proc) -> bool:
    if not proc.alive():
        raise AssertionError(f"{proc.name} exited with {proc.p.returncode}:\n{proc.log()}")
    return False


def sandbox_token(url: str) -> str:
    r = httpx.post(f"{url}/oauth2/token", data={"grant_type": "client_credentials"}, auth=("sandbox-client", "sandbox-secret"), timeout=10)
    r.raise_for_status()
    return str(r.json()["access_token"])


def create_tasks(url: str, contents: list[Any]) -> list[str]:
    """POST /api/ai-tasks, as the product does; returns the new ids."""
    headers = {"Authorization": f"Bearer {sandbox_token(url)}"}
    ids = []
    with httpx.Client(timeout=10, headers=headers) as c:
        for content in contents:
            r = c.post(f"{url}/api/ai-tasks", json={"type": "text_embedding", "content": content,
                                                    "callbackRoute": "verification_update_embedding", "callbackParams": {}})
            r.raise_for_status()
            ids.append(r.json()["_id"])
    return ids


def sandbox_states(url: str) -> dict[str, int]:
    return dict(httpx.get(f"{url}/_sandbox/stats", timeout=10).json()["states"])


def sandbox_fault(url: str, **fault: Any) -> None:
    httpx.post(f"{url}/_sandbox/faults", json=fault, timeout=10).raise_for_status()
