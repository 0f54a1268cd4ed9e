"""Print a real /metrics scrape of a running daemon (for `promtool check metrics`).

Starts the sandbox and the daemon (mock backend, rate limits on) as processes, lets the
daemon drain some tasks, then prints what Prometheus would scrape.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    sandbox = subprocess.Popen([sys.executable, "-m", "processor", "sandbox", "--port", "0", "--seed", "300", "--malformed"],
                               stdout=subprocess.PIPE, text=True)
    assert sandbox.stdout is not None
    url = next(line.rsplit(" ", 1)[-1].strip() for line in sandbox.stdout if "listening on" in line)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "API_BASE_URL": url, "OAUTH2_TOKEN_URL": f"{url}/oauth2/token", "OAUTH2_CLIENT_ID": "sandbox-client",
               "OAUTH2_CLIENT_SECRET": "sandbox-secret", "PROCESSING_MODE": "mock", "STATE_DIR": tmp, "METRICS_HOST": "127.0.0.1",
               "METRICS_PORT": str(port), "RATE_LIMIT_PER_HOUR": "10000", "RATE_LIMIT_PER_DAY": "100000", "LOG_LEVEL": "WARNING"}
        daemon = subprocess.Popen([sys.executable, "-m", "processor", "run"], env=env, stdout=subprocess.DEVNULL)
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                time.sleep(0.5)
                try:
                    states = httpx.get(f"{url}/_sandbox/stats").json()["states"]
                except httpx.HTTPError:
                    continue
                if states.get("succeeded", 0) >= 300:
                    break
            sys.stdout.write(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
        finally:
            daemon.terminate()
            daemon.wait(timeout=40)
            sandbox.terminate()
            sandbox.wait(timeout=10)


if __name__ == "__main__":
    main()
