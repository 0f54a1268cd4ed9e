"""Token-aware pacing against a fake OpenAI with a real per-minute limit (not a unit test).

    python bench/openai_pacing.py                      # embeddings (daemon) and chat (adapter)
    python bench/openai_pacing.py --only embeddings
    python bench/openai_pacing.py --tokens 150000 --tpm 100000

Embeddings: the daemon (a subprocess, PROCESSING_MODE=openai) drains a sandbox backlog of
`--tokens` tokens (tasks of 165 characters, 50 tokens each as the fake counts them)
against `processor.sandbox.fake_openai_limits` (sliding minute, 429 past the limit).
Chat: the OpenAI chat adapter, 5 concurrent callers, a backlog of the same size in
requests of about 500 tokens (prompt + completion), against the same fake.

Figures: the busiest sliding minute ÷ the limit (≤ 1: never over; ≥ 0.95: used to the
full), the ideal time ÷ the time taken (a client keeping exactly to the limit sends a
minute's worth at once and the rest as the minute frees it: 60 s for 150,000 tokens at
100,000/min), the share of requests answered 429, time from the first request to the last
accepted one, and the daemon's CPU per task.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import drain  # noqa: E402  (bench/drain.py: the sandbox process and /proc helpers)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TEXT_SIZE = 165  # 50 tokens as the fake counts (3.3 characters a token); 41 by chars/4


class FakeProc:
    def __init__(self, tpm: int, rpm: int) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "processor.sandbox.fake_openai_limits", "--port", "0", "--tpm", str(tpm), "--rpm", str(rpm)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "listening on" in line:
                self.url = line.rsplit(" ", 1)[-1].strip()
                return
        raise RuntimeError("fake OpenAI did not start")

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/_fake/stats", timeout=30).json()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def busiest_minute(charges: list[tuple[float, int]], window: float) -> int:
    """Most tokens accepted within any `window` seconds (two pointers over sorted times)."""
    charges = sorted(charges)
    best = total = lo = 0
    for at, tokens in charges:
        total += tokens
        while charges[lo][0] <= at - window:
            total -= charges[lo][1]
            lo += 1
        best = max(best, total)
    return best


def report(kind: str, stats: dict, backlog: int, extra: str = "") -> bool:
    tpm, window = stats["tpm"], stats["window"]
    charges = [(float(a), int(t)) for a, t in stats["charges"]]
    elapsed = stats["last_ok_at"] - stats["first_at"]
    ideal = window * max(0, math.ceil(stats["tokens"] / tpm) - 1)
    busiest = busiest_minute(charges, window)
    share = stats["rejected"] / max(1, stats["requests"])
    print(f"\n{kind}: {stats['tokens']:,} tokens (backlog ~{backlog:,}) against {tpm:,} tokens/min, sliding minute")
    print(f"   first request to last accepted: {elapsed:.1f} s (ideal {ideal:.0f} s); ideal/taken {ideal / elapsed if elapsed else 0:.3f}  (target >= 0.95; done within {ideal + 3:.0f} s)")
    print(f"   busiest sliding minute: {busiest:,} tokens = {busiest / tpm:.3f} of the limit  (target 0.95-1.0)")
    print(f"   requests {stats['requests']}, answered 429: {stats['rejected']} = {100 * share:.2f} %  (target <= 1 %)")
    if extra:
        print(f"   {extra}")
    if os.environ.get("PACING_TIMELINE"):
        t0 = stats["first_at"]
        print("   accepted (s, tokens):", " ".join(f"{a - t0:.2f}/{t}" for a, t in charges))
        print("   429 (s, tokens):", " ".join(f"{a - t0:.2f}/{t}" for a, t in stats["rejections"]))
    return elapsed <= ideal + 3 and share <= 0.01 and busiest <= tpm


def embeddings(tokens: int, tpm: int, rpm: int) -> bool:
    n = math.ceil(tokens / 50)
    fake = FakeProc(tpm, rpm)
    sb = drain.SandboxProc(n, text_size=TEXT_SIZE)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = drain._env(sb, tmp, {
                "PROCESSING_MODE": "openai", "OPENAI_API_KEY": "sk-fake-pacing", "OPENAI_BASE_URL": fake.url,
                "CONCURRENCY_LIMIT": "5", "API_CONCURRENCY": "8", "MAX_BATCH_SIZE": "64",
                # a minute's worth in hand while the minute is spent: after the wait, requests go
                # as fast as the minute frees, not as fast as the intake refills (256 by default)
                "INTAKE_CAPACITY": "1024",
            })
            proc = subprocess.Popen([PY, "-m", "processor", "run"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
            t0 = time.perf_counter()
            try:
                while time.perf_counter() - t0 < 240:
                    time.sleep(0.25)
                    states = sb.stats()["states"]
                    if states.get("succeeded", 0) + states.get("failed", 0) >= n:
                        break
                cpu = drain.proc_cpu_seconds(proc.pid)
            finally:
                proc.terminate()
                proc.wait(timeout=40)
        states = sb.stats()["states"]
        return report("embeddings (daemon)", fake.stats(), tokens,
                      f"tasks {states}; daemon CPU {1000 * cpu / n:.2f} ms per task (start-up included)")
    finally:
        sb.close()
        fake.close()


async def _chat(url: str, tokens: int) -> int:
    from prometheus_client import CollectorRegistry

    from processor.effects.chat.base import ChatError, ChatRequest
    from processor.effects.chat.metrics import ChatMetrics
    from processor.effects.chat.openai import OpenAIChat
    from processor.effects.logs import configure_logging

    configure_logging("WARNING", "json")

    chat = OpenAIChat(api_key="sk-fake-pacing", base_url=url, timeout=30, max_tokens=200, metrics=ChatMetrics(CollectorRegistry()))
    system = "Extract the people named in the text. Answer with JSON that follows the schema."
    user = "Texto: " + ("o ministro disse que a reforma será votada amanhã no congresso " * 24)[:1500]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    n = math.ceil(tokens / 500)  # ~460 prompt + 40 completion tokens as the fake counts
    queue = iter(range(n))
    errors = 0

    async def worker() -> None:
        nonlocal errors
        for i in queue:
            while True:
                try:
                    await chat.complete(ChatRequest("gpt-4o-mini", system, f"{i}. {user}", schema, "people", "identifying_data"))
                    break
                except ChatError as exc:
                    errors += 1
                    await trio.sleep(exc.retry_after or 1.0)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(worker)
    await chat.aclose()
    return n


def chat(tokens: int, tpm: int, rpm: int) -> bool:
    fake = FakeProc(tpm, rpm)
    try:
        cpu0 = time.process_time()
        n = trio.run(_chat, fake.url, tokens)
        cpu = time.process_time() - cpu0
        return report("chat (adapter, 5 callers)", fake.stats(), tokens, f"{n} requests; client CPU {1000 * cpu / n:.2f} ms per request")
    finally:
        fake.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=150_000)
    ap.add_argument("--tpm", type=int, default=100_000)
    ap.add_argument("--rpm", type=int, default=5_000)
    ap.add_argument("--only", choices=("embeddings", "chat"))
    args = ap.parse_args()
    print(f"machine: {drain.machine()}")
    ok = True
    if args.only in (None, "embeddings"):
        ok &= embeddings(args.tokens, args.tpm, args.rpm)
    if args.only in (None, "chat"):
        ok &= chat(args.tokens, args.tpm, args.rpm)
    print("\nall targets met" if ok else "\nsome target missed")
    os._exit(0)


if __name__ == "__main__":
    main()
