"""A busy Ollama: 20 % of embedding calls answered 503, MAX_BATCH_SIZE=4 (issue 11).

    python bench/busy_backend.py [--tasks 1500] [--busy 0.2] [--batch 4] [--timeout 600]

Targets: every task succeeds, <= 2.05 PATCHes per task (a claim and a report each; a
release and re-claim after a busy answer is churn). The fake Ollama answers one request at
a time (20 ms + 1 ms per input). The daemon runs as its own process; HOSTILE_DAEMON_SRC=<tree>/src
runs another tree's daemon (e.g. a6a26dd).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import trio

from processor.sandbox.fake_backends import FakeBackendState
from processor.sandbox.harness import DAEMON_SRC, event_names, hostile_world


async def main(args: argparse.Namespace) -> None:
    fake = FakeBackendState(base=0.02, per_input=0.001, dim=768, serial=True, busy=args.busy)
    with tempfile.TemporaryDirectory(prefix="bench-busy-") as tmp:
        async with hostile_world(Path(tmp), fake=fake) as w:
            w.offer_valid(args.tasks, text_size=100)
            t0 = time.monotonic()
            d = await w.start("ollama", minimal=True, LOG_LEVEL="INFO", MAX_BATCH_SIZE=str(args.batch))
            with trio.move_on_after(args.timeout):
                while d.alive():
                    s = w.states()
                    if s.get("succeeded", 0) + s.get("failed", 0) >= args.tasks and not s.get("in_progress"):
                        break
                    await trio.sleep(0.5)
            wall = time.monotonic() - t0
            states = w.states()
            patches = Counter(p.state for p in w.sandbox.patches)
            events = Counter(event_names(d.log_text()))
            alive = d.alive()
            await d.stop()
    n = args.tasks
    print(f"daemon from {DAEMON_SRC or 'this tree'}; fake Ollama, {args.busy:.0%} of calls answered 503, MAX_BATCH_SIZE={args.batch}")
    print(f"tasks: {n}; after {wall:.0f} s: {states.get('succeeded', 0)} succeeded, {states.get('failed', 0)} failed, "
          f"{states.get('pending', 0)} pending, {states.get('in_progress', 0)} in_progress; daemon alive: {alive}")
    print(f"PATCHes per task: {sum(patches.values()) / n:.3f} vs target 2.05 ({dict(patches)})")
    print(f"backend: {fake.requests} requests ({fake.statuses.get('503', 0)} answered 503) for {-(-n // args.batch)} batches")
    interesting = {k: v for k, v in events.items() if any(w in k for w in ("gave_up", "released", "retry", "budget", "failed", "crash"))}
    print(f"log events: {interesting}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=1500)
    ap.add_argument("--busy", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=600.0)
    trio.run(main, ap.parse_args())
