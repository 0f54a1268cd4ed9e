"""Tasks/s with 1, 2 and 3 replicas sharing Redis (drain workload, mock backend), with
Redis round trips per task. Needs Redis at 127.0.0.1:6379.

    python bench/replicas.py [--tasks 2000]
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drain import PY, ROOT, SandboxProc, _env, machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n_replicas: int, n: int) -> tuple[float, float]:
    sb = SandboxProc(n)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    procs, ports = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(n_replicas):
                port = free_port()
                env = _env(sb, f"{tmp}/r{i}", {"STATE_BACKEND": "redis", "REDIS_URL": "redis://127.0.0.1:6379/0",
                                              "REDIS_KEY_PREFIX": prefix, "METRICS_PORT": str(port),
                                              "RATE_LIMIT_ENABLED": "true", "RATE_LIMIT_PER_DAY": "100000000"})
                procs.append(subprocess.Popen([PY, "-m", "processor", "run"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL))
                ports.append(port)
            while True:
                time.sleep(0.2)
                stats = sb.stats()
                if stats["states"].get("succeeded", 0) >= n:
                    break
            trips = 0.0
            for port in ports:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
                trips += sum(float(v) for v in re.findall(r'^redis_round_trips_total\{[^}]*\} ([0-9.e+]+)$', text, re.M))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=40)
        sb.close()
    seconds = stats["last_patch_at"] - stats["first_token_at"]
    return n / seconds, trips / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=2000)
    n = ap.parse_args().tasks
    print(f"machine: {machine()}")
    print(f"{'replicas':>8} {'tasks/s':>9} {'Redis round trips/task':>24}")
    for k in (1, 2, 3):
        rate, trips = run(k, n)
        print(f"{k:>8} {rate:>9.0f} {trips:>24.2f}")
    print("(one sandbox process serves all replicas on the same 2 cores: it, not Redis, is the ceiling here)")


if __name__ == "__main__":
    main()
