"""A slow CPU embedding server and the daemon with DEFAULT settings (issue 11).

    python bench/slow_backend.py [--tasks 128] [--chars 2000] [--timeout 300] [--mode openai|ollama] [--sigterm-after S]

The fake server (processor.sandbox.fake_backends, slow mode) computes one request at a time,
1 s per 2,000 characters, and finishes a request whose client gave up before it starts the
next one, like an OpenAI-compatible embedding server on a CPU (`--mode openai`, the
default: the daemon sends requests in parallel there) or a CPU-only Ollama (`--mode ollama`). The ideal is its compute time for every text once
(128 s for 128 texts of 2,000 characters). Targets: done within 240 s, <= 2.2 PATCHes per
task, then SIGTERM exits 0 within the grace with nothing left in_progress. `--sigterm-after S`
sends the SIGTERM S seconds after the start instead, with work still in flight.

The daemon runs as its own process (`python -m processor run`); HOSTILE_DAEMON_SRC=<tree>/src
runs another tree's daemon (e.g. a6a26dd) against the same world.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

import trio

from processor.sandbox.fake_backends import SLOW_PER_CHAR, FakeBackendState
from processor.sandbox.harness import DAEMON_SRC, LOCAL_MODEL, REMOTE_MODEL, event_names, hostile_world

# DEFAULT settings: only what says where the peers are and where state lives.
GRACE = 25.0  # SHUTDOWN_GRACE_SECONDS default


async def main(args: argparse.Namespace) -> None:
    fake = FakeBackendState(base=0.0, per_input=0.0, dim=768 if args.mode == "ollama" else 1024, slow_per_char=SLOW_PER_CHAR)
    ideal = args.tasks * args.chars * SLOW_PER_CHAR
    with tempfile.TemporaryDirectory(prefix="bench-slow-") as tmp:
        async with hostile_world(Path(tmp), fake=fake) as w:
            model = LOCAL_MODEL if args.mode == "ollama" else REMOTE_MODEL
            w.offer_valid(args.tasks, model=model, text_size=args.chars)
            t0 = time.monotonic()
            d = await w.start(args.mode, minimal=True, LOG_LEVEL="INFO")
            done_at = None
            with trio.move_on_after(args.sigterm_after if args.sigterm_after is not None else args.timeout):
                while d.alive():
                    states = w.states()
                    if states.get("succeeded", 0) + states.get("failed", 0) >= args.tasks:
                        done_at = time.monotonic()
                        break
                    await trio.sleep(0.5)
            wall = (done_at or time.monotonic()) - t0
            states = w.states()
            patches = len(w.sandbox.patches)
            t1 = time.monotonic()
            d.signal(signal.SIGTERM)
            code = await d.wait_exit(GRACE + 10)
            exit_s = time.monotonic() - t1
            if code is None:
                d.kill()
            left = w.states().get("in_progress", 0)
            events = Counter(event_names(d.log_text()))
    print(f"daemon from {DAEMON_SRC or 'this tree'}; fake {args.mode}, slow CPU server (1 s per 2,000 characters, one request at a time,"
          " abandoned requests still computed)")
    print(f"tasks: {args.tasks} x {args.chars} characters; ideal (server compute once): {ideal:.0f} s")
    print(f"done: {states.get('succeeded', 0)} succeeded, {states.get('failed', 0)} failed, {states.get('pending', 0)} pending, "
          f"{states.get('in_progress', 0)} in_progress after {wall:.0f} s" + ("" if done_at else f" (cut at {wall:.0f} s)"))
    print(f"wall time: {wall:.0f} s vs target 240 s; ratio to ideal {wall / ideal:.2f}")
    print(f"PATCHes per task: {patches / args.tasks:.2f} vs target 2.2 ({patches} PATCHes)")
    print(f"backend: {fake.requests} requests, {sum(fake.inputs.values())} inputs sent for {args.tasks} texts; "
          f"server still busy {max(0.0, fake.busy_until - trio.current_time()):.0f} s past the end")
    print(f"SIGTERM: exit {code if code is not None else 'none (killed)'} after {exit_s:.1f} s (grace {GRACE:.0f} s); "
          f"in_progress left: {left}")
    notable = ("timeout", "split", "gave_up", "released", "breaker", "retry", "abandon", "adaptive", "size", "failed", "crash")
    print(f"log events: {dict(sorted((k, v) for k, v in events.items() if any(n in k for n in notable)))}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=128)
    ap.add_argument("--chars", type=int, default=2000)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--mode", choices=("ollama", "openai"), default="openai")
    ap.add_argument("--sigterm-after", type=float, default=None, help="seconds after the start: SIGTERM with work in flight")
    trio.run(main, ap.parse_args())
