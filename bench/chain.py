"""Triage-chain benchmark against the fakes (not a unit test).

    python bench/chain.py                       # 1,000 claims, chat 800 ms, Wikidata 150 ms
    python bench/chain.py --claims 200 --concurrency 16

The triage world (`python -m processor.sandbox.world`: the sandbox task API playing the
platform's chain, a fake model server, a fake Wikidata) and the daemon (`processor run`,
openai mode against the fakes) run as separate processes. Every claim goes
text_embedding -> identifying_data -> (defining_topics, defining_impact_area) -> defining_severity.

Printed per run: wall time from the first claim seeded to the last severity accepted, and
the ideal of the same run: the largest of
- the chain's critical path (three chat answers in a row, plus one Wikidata round per step
  that needs one),
- the chat work at the configured concurrency (model calls actually made x latency / CONCURRENCY_LIMIT),
- the Wikidata work one request at a time (requests actually made x latency);
then model calls per triage task (1.0 plus retries) and Wikidata requests per task. The
second run uses new claims with the same texts and the same state directory: its Wikidata
lookups come from the durable cache (cache hits are read from the daemon's metrics).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TRIAGE = ("identifying_data", "defining_topics", "defining_impact_area", "defining_severity")


class WorldProc:
    def __init__(self, *, claims: int, chat_latency: float, wikidata_latency: float, bad_rate: float) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "processor.sandbox.world", "--claims", str(claims), "--chat-latency", str(chat_latency),
             "--wikidata-latency", str(wikidata_latency), "--bad-rate", str(bad_rate)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        assert self.proc.stdout is not None
        self.env: dict[str, str] = {}
        while "WIKIDATA_API_URL" not in self.env:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("world did not start")
            if "=" in line:
                k, _, v = line.strip().partition("=")
                self.env[k] = v
        self.started = time.perf_counter()

    def summary(self) -> dict:
        return httpx.get(f"{self.env['API_BASE_URL']}/_chain/summary", timeout=30).json()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def metric(url: str, name: str, labels: dict[str, str]) -> float:
    text = httpx.get(url, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def one_run(args: argparse.Namespace, state_dir: str, metrics_port: int) -> dict:
    world = WorldProc(claims=args.claims, chat_latency=args.chat_latency, wikidata_latency=args.wikidata_latency,
                      bad_rate=args.bad_rate)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OLLAMA_", "WIKIDATA_"))}, **world.env,
           "PROCESSING_MODE": "openai", "OPENAI_API_KEY": "sk-bench", "STATE_DIR": state_dir, "METRICS_HOST": "127.0.0.1",
           "METRICS_PORT": str(metrics_port), "RATE_LIMIT_ENABLED": "false", "CONCURRENCY_LIMIT": str(args.concurrency),
           "WIKIDATA_CONTACT": "bench@example.org", "LOG_LEVEL": "WARNING", "DEFAULT_MODEL": "nomic-embed-text"}
    daemon = subprocess.Popen([PY, "-m", "processor", "run"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        deadline = time.perf_counter() + args.timeout
        while True:
            s = world.summary()
            if s["complete"] >= args.claims or time.perf_counter() > deadline:
                break
            time.sleep(0.5)
        wall = time.perf_counter() - world.started
        hits = metric(metrics_url, "wikidata_cache_lookups_total", {"result": "hit"})
        misses = metric(metrics_url, "wikidata_cache_lookups_total", {"result": "miss"})
        degraded = metric(metrics_url, "wikidata_enrichment_degraded_total", {})
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        world.close()
    return {"summary": s, "wall": wall, "hits": hits, "misses": misses, "degraded": degraded}


def report(name: str, args: argparse.Namespace, run: dict, before: tuple[float, float]) -> None:
    s = run["summary"]
    triage_tasks = sum(s["accepted"].get(t, 0) for t in TRIAGE)
    chat_calls = s["chat"]["requests"].get("/v1/chat/completions", 0)
    wd_requests = s["wikidata"]["total"]
    critical = 3 * args.chat_latency + 3 * args.wikidata_latency
    chat_bound = chat_calls * args.chat_latency / args.concurrency
    wikidata_bound = wd_requests * args.wikidata_latency
    ideal = max(critical, chat_bound, wikidata_bound)
    hits, misses = run["hits"] - before[0], run["misses"] - before[1]
    print(f"{name}: {s['complete']}/{args.claims} claims complete, states {s['states']}, refused {s['refused'] or 0}")
    print(f"  wall {run['wall']:.1f} s; ideal {ideal:.1f} s (critical path {critical:.1f}, chat {chat_bound:.1f}, "
          f"wikidata {wikidata_bound:.1f}); ratio {run['wall'] / ideal:.2f}")
    print(f"  model calls per triage task {chat_calls / max(1, triage_tasks):.3f} ({chat_calls} calls, {triage_tasks} tasks, "
          f"answers {s['chat']['answers']})")
    print(f"  Wikidata requests per triage task {wd_requests / max(1, triage_tasks):.3f} ({s['wikidata']['requests']}); "
          f"cache hits {hits:.0f}/{hits + misses:.0f} ({100 * hits / max(1, hits + misses):.1f} %); "
          f"max in flight {s['wikidata']['max_in_flight']}; results sent without ids {run['degraded']:.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--claims", type=int, default=1000)
    p.add_argument("--chat-latency", type=float, default=0.8)
    p.add_argument("--wikidata-latency", type=float, default=0.15)
    p.add_argument("--bad-rate", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=32, help="CONCURRENCY_LIMIT of the daemon")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--port", type=int, default=18931, help="the daemon's METRICS_PORT")
    args = p.parse_args()
    print(f"{args.claims} claims, chat {args.chat_latency * 1000:.0f} ms, Wikidata {args.wikidata_latency * 1000:.0f} ms, "
          f"concurrency {args.concurrency}, bad answers {args.bad_rate:.0%}")
    with tempfile.TemporaryDirectory(prefix="processor-bench-chain-") as tmp:
        first = one_run(args, tmp, args.port)
        report("first run (empty cache)", args, first, (0.0, 0.0))
        second = one_run(args, tmp, args.port)
        report("second run (same texts, cache kept)", args, second, (0.0, 0.0))


if __name__ == "__main__":
    main()
