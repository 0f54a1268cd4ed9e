"""Drain, memory and CPU benchmarks against the sandbox on loopback (not a unit test).

    python bench/drain.py                 # drain 2,000 tasks + ceiling + CPU + memory
    python bench/drain.py --tasks 5000    # bigger drain
    python bench/drain.py --skip-memory

The sandbox and the daemon run as separate processes (as in production), so the daemon's
CPU time and peak RSS are its own. The ceiling is a minimal trio + httpx client doing the
same HTTP calls (one GET of the pending list, then per task a claim PATCH and a result
PATCH carrying 1,024 floats) with the same concurrency against the same sandbox.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
import trio

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


class SandboxProc:
    def __init__(self, tasks: int, text_size: int = 60) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "processor", "sandbox", "--port", "0", "--seed", str(tasks), "--text-size", str(text_size)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("sandbox did not start")
            if "listening on" in line:
                self.url = line.rsplit(" ", 1)[-1].strip()
                return

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/_sandbox/stats", timeout=30).json()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _env(sb: SandboxProc, state_dir: str, extra: dict[str, str] | None) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")},
        "API_BASE_URL": sb.url, "OAUTH2_TOKEN_URL": f"{sb.url}/oauth2/token",
        "OAUTH2_CLIENT_ID": "sandbox-client", "OAUTH2_CLIENT_SECRET": "sandbox-secret",
        "PROCESSING_MODE": "mock", "STATE_DIR": state_dir, "METRICS_PORT": "0", "METRICS_HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING", "RATE_LIMIT_ENABLED": "false", "POLLING_INTERVAL_SECONDS": "1", **(extra or {}),
    }


def run_daemon(sb: SandboxProc, n: int, *, concurrency: int, api_concurrency: int, extra: dict[str, str] | None = None, timeout: float = 600) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = _env(sb, tmp, {"CONCURRENCY_LIMIT": str(concurrency), "API_CONCURRENCY": str(api_concurrency), **(extra or {})})
        t0 = time.perf_counter()
        proc = subprocess.Popen([PY, "-m", "processor", "run"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        done = 0
        peak = 0.0
        try:
            while time.perf_counter() - t0 < timeout:
                time.sleep(0.1)
                states = sb.stats()["states"]
                done = states.get("succeeded", 0) + states.get("failed", 0)
                peak = max(peak, proc_peak_rss_mb(proc.pid))
                if done >= n:
                    break
            elapsed = time.perf_counter() - t0
            cpu = proc_cpu_seconds(proc.pid)
            peak = max(peak, proc_peak_rss_mb(proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=40)
        stats = sb.stats()
        requests = sum(v for k, v in stats["requests"].items() if not k.startswith(("admin", "token")))
        work = stats["last_patch_at"] - stats["first_token_at"]  # first request to last report
        return {"seconds": elapsed, "work_seconds": work, "done": done, "cpu": cpu, "peak_rss_mb": peak,
                "requests": requests, "states": stats["states"]}


def idle_cpu(extra: dict[str, str] | None = None) -> float:
    """CPU a daemon spends starting up and polling an empty list for 3 s."""
    sb = SandboxProc(0)
    try:
        env = _env(sb, "/tmp", extra)
        proc = subprocess.Popen([PY, "-m", "processor", "run"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        time.sleep(3)
        cpu = proc_cpu_seconds(proc.pid)
        proc.terminate()
        proc.wait(timeout=40)
        return cpu
    finally:
        sb.close()


async def ceiling_client(url: str, n: int, concurrency: int) -> float:
    vector = [0.03125 + i * 1e-7 for i in range(1024)]  # floats of the length a real vector prints
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=concurrency + 2)) as c:
        t0 = time.perf_counter()
        r = await c.post("/oauth2/token", data={"grant_type": "client_credentials", "scope": "read write"}, auth=("sandbox-client", "sandbox-secret"))
        h = {"Authorization": f"Bearer {r.json()['access_token']}", "Content-Type": "application/json"}
        tasks = (await c.get("/api/ai-tasks/pending", headers=h)).json()
        ids = [t["_id"] for t in tasks][:n]
        claim = orjson.dumps({"state": "in_progress"})
        result = orjson.dumps({"state": "succeeded", "result": vector})
        queue = iter(ids)

        async def worker() -> None:
            for tid in queue:
                await c.patch(f"/api/ai-tasks/{tid}", content=claim, headers=h)
                await c.patch(f"/api/ai-tasks/{tid}", content=result, headers=h)

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        return time.perf_counter() - t0


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--api-concurrency", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=5)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-tasks", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3, help="drain/ceiling pairs; the median ratio is the figure")
    args = ap.parse_args()
    n = args.tasks
    print(f"machine: {machine()}")

    runs = []
    for _ in range(args.repeat):
        sb = SandboxProc(n)
        try:
            d = run_daemon(sb, n, concurrency=args.concurrency, api_concurrency=args.api_concurrency)
        finally:
            sb.close()
        sb = SandboxProc(n)
        try:
            cpu0 = time.process_time()
            trio.run(ceiling_client, sb.url, n, args.api_concurrency)
            ceiling_cpu = time.process_time() - cpu0
            stats = sb.stats()
            ceiling = stats["last_patch_at"] - stats["first_token_at"]
        finally:
            sb.close()
        runs.append((d, ceiling, ceiling_cpu))
    startup_cpu = idle_cpu()
    print(f"\n1. drain: {n} tasks, mock backend, API_CONCURRENCY={args.api_concurrency}, {args.repeat} runs (each: daemon, then ceiling)")
    ratios = []
    for d, ceiling, _ in runs:
        rate, ceil_rate = n / d["work_seconds"], n / ceiling
        ratios.append(rate / ceil_rate)
        print(f"   daemon {d['work_seconds']:.2f} s = {rate:.0f} tasks/s ({d['requests'] / n:.3f} API requests/task, {d['states']}); "
              f"ceiling {ceiling:.2f} s = {ceil_rate:.0f} tasks/s; ratio {rate / ceil_rate:.2f}")
    print(f"   median ratio daemon/ceiling: {statistics.median(ratios):.2f}  (target >= 1.0)")
    print("   (the ceiling is a minimal client doing the same calls with the same concurrency; times run from the first token"
          " request to the last PATCH, as the sandbox saw them; process start-up is not counted)")
    cpus = sorted(1000 * (d["cpu"] - startup_cpu) / n for d, _, _ in runs)
    ceiling_cpus = sorted(1000 * c / n for _, _, c in runs)
    print(f"\n3. CPU: daemon {statistics.median(cpus):.2f} CPU ms per task (median; start-up and idle polling, {startup_cpu:.2f} s, "
          f"measured alone and subtracted); runs: {', '.join(f'{c:.2f}' for c in cpus)}")
    print(f"   ceiling client {statistics.median(ceiling_cpus):.2f} CPU ms per task (median, in this process); "
          f"daemon/ceiling CPU {statistics.median(cpus) / statistics.median(ceiling_cpus):.2f}")

    if not args.skip_memory:
        small = SandboxProc(2000, text_size=2000)
        try:
            m_small = run_daemon(small, 2000, concurrency=args.concurrency, api_concurrency=args.api_concurrency)
        finally:
            small.close()
        big = SandboxProc(args.memory_tasks, text_size=2000)
        try:
            m_big = run_daemon(big, args.memory_tasks, concurrency=args.concurrency, api_concurrency=args.api_concurrency)
        finally:
            big.close()
        print("\n2. memory: peak RSS of the daemon, pending tasks of 2 KB text")
        print(f"   2,000 pending : {m_small['peak_rss_mb']:.1f} MB")
        print(f"   {args.memory_tasks:,} pending: {m_big['peak_rss_mb']:.1f} MB  (target <= 120 MB; difference {m_big['peak_rss_mb'] - m_small['peak_rss_mb']:+.1f} MB, target <= 10 MB)")


if __name__ == "__main__":
    main()
