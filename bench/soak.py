"""Soak: the daemon against the sandbox with random faults at every dependency (issue 11).

    python bench/soak.py [--minutes 10] [--replicas 2] [--rate 6] [--limit 400] [--seed 1] [--warmup S] [--env NAME=VALUE]

For `--minutes`, tasks arrive at about `--rate` per second (in bursts) while a fault
schedule switches, every 5-20 s, between calm and a random mix of: task API 5xx, broken
connections and 401s (tokens revoked), token endpoint errors and odd token answers,
backend 5xx / 429 / timeouts (hangs past OLLAMA_TIMEOUT) / malformed 200s, and, with
`--replicas` > 1, restarts of a test-owned redis-server on its own port (append-only file
on, so a restart keeps the counters as a real deployment's would). Then the faults stop,
the feed stops, and the backlog drains. Everything runs on loopback.

Prints: tasks/s, lost (valid tasks failed or never done), stuck (in_progress after the
drain), crashes (a daemon that exited on its own; it is restarted), duplicates (succeeded
twice; conflicting = with different results), limit overshoot (units in any 60 s window
over RATE_LIMIT_PER_MINUTE), RSS and open FDs of each daemon, and the redactor's size when
the daemon exposes it in /metrics (`processor_redactor_secrets`).

RSS and FDs are sampled every 30 s. Growth is measured from the end of `--warmup` (default: a
tenth of the run, at most 300 s) to the end, each as the median of 5 samples (2.5 min), and
printed with the single figures at 20 s, after warm-up and at the end: in its first minutes a
daemon's RSS rises to the high-water mark of its allocators (glibc's heap and CPython's arenas
keep memory freed after the biggest burst so far: a fault phase that piles up claims and
results) and its connection pools fill (keep-alive connections to the task API, the backend,
Redis). That is bounded; what must not happen is growth with the number of tasks, which shows
as growth after warm-up.

`--memstats DIR`: each daemon also writes its memory figures (live Python objects, CPython's
arenas, glibc's heap) every 30 s to DIR/<pid>.jsonl (bench/memstats/sitecustomize.py), to
tell a growing structure from the allocator's high-water mark.

HOSTILE_DAEMON_SRC=<tree>/src runs another tree's daemon against the same world.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from processor.sandbox.app import Fault, TokenAnswer
from processor.sandbox.fake_backends import Answer, FakeBackendState, expected_vector
from processor.sandbox.harness import DAEMON_SRC, LOCAL_MODEL, OLLAMA_DIM, Daemon, free_port, hostile_world

EARLY = 20.0  # the first figures (the only ones before the warm-up was configurable)
SAMPLE_EVERY = 30.0
DRAIN_TIMEOUT = 300.0


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class Redis:
    """A redis-server owned by the soak, on its own port, with its data in a temp dir."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True)
            if r.stdout.strip() == "PONG":
                return
            time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None


def fault_mix(rng: random.Random) -> dict[str, Any]:
    """One hostile phase: a few faults, each at a moderate rate."""
    mix: dict[str, Any] = {"faults": {}, "answers": [], "busy": 0.0, "token": None, "revoke": False, "redis": False}
    picks = rng.sample(["api5xx", "drops", "revoke", "token", "backend5xx", "timeouts", "malformed", "busy", "redis"], k=rng.randint(1, 3))
    for p in picks:
        if p == "api5xx":
            route = rng.choice(["pending", "claim", "report", "release", "patch"])
            mix["faults"][route] = Fault(status=rng.choice([500, 502, 503]), probability=rng.uniform(0.1, 0.4), apply=rng.random() < 0.3)
        elif p == "drops":
            route = rng.choice(["pending", "claim", "report", "token"])
            mix["faults"][route] = Fault(drop=True, apply=rng.random() < 0.5, probability=rng.uniform(0.05, 0.3))
        elif p == "revoke":
            mix["revoke"] = True
        elif p == "token":
            mix["token"] = rng.choice([
                TokenAnswer(fields={"expires_in": b"NaN"}, count=2), TokenAnswer(fields={"expires_in": b"-1"}, count=2),
                TokenAnswer(raw=b'{"error": "temporarily_unavailable"}', status=503, count=3),
                TokenAnswer(fields={"access_token": b'"tok-\\u00e9-0123456789"'}, count=1), TokenAnswer(drop=("access_token",), count=2),
            ])
        elif p == "backend5xx":
            mix["answers"].append(Answer("status", status=rng.choice([500, 503, 429]), probability=rng.uniform(0.1, 0.4)))
        elif p == "timeouts":
            mix["answers"].append(Answer("hang", latency=8.0, probability=rng.uniform(0.05, 0.2)))
        elif p == "malformed":
            mix["answers"].append(Answer(rng.choice(["null", "html", "no_data", "wrong_count", "wrong_dims", "nan", "truncated", "reset"]),
                                         probability=rng.uniform(0.05, 0.25)))
        elif p == "busy":
            mix["busy"] = 0.2
        elif p == "redis":
            mix["redis"] = True
    return mix


async def soak(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    fake = FakeBackendState(base=0.02, per_input=0.001, dim=OLLAMA_DIM, serial=True)
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    redis: Redis | None = None
    if args.replicas > 1:
        if shutil.which("redis-server") is None:
            raise SystemExit("--replicas > 1 needs redis-server on PATH")
        redis = Redis(workdir)
        redis.start()
    crashes: list[str] = []
    async with hostile_world(workdir, fake=fake) as w:
        st = w.sandbox
        st.keep_results = False
        text_of: dict[str, str] = {}
        st.result_check = lambda tid, res: _right(res, text_of.get(tid))
        env: dict[str, str] = {"RATE_LIMIT_ENABLED": "true", "RATE_LIMIT_PER_MINUTE": str(args.limit), "OLLAMA_TIMEOUT": "5",
                               "LOG_LEVEL": "INFO", "POLLING_INTERVAL_SECONDS": "1", "RETRY_MAX_DELAY_SECONDS": "5"}
        if args.memstats:
            hook = str(Path(__file__).resolve().parent / "memstats")
            env.update(SOAK_MEMSTATS_DIR=str(Path(args.memstats).resolve()),
                       PYTHONPATH=os.pathsep.join(p for p in (hook, DAEMON_SRC or os.environ.get("PYTHONPATH")) if p))
        env.update(dict(kv.split("=", 1) for kv in args.env))
        if redis is not None:
            env.update(STATE_BACKEND="redis", REDIS_URL=f"redis://127.0.0.1:{redis.port}/0", REDIS_KEY_PREFIX=f"soak{args.seed}")
        daemons: list[Daemon] = []
        for i in range(args.replicas):
            daemons.append(await w.start("ollama", STATE_DIR=str(workdir / f"state{i}"), **env))
        t_start, wall_start = time.monotonic(), time.time()
        end_feed = t_start + args.minutes * 60
        warmup = args.warmup if args.warmup is not None else min(300.0, args.minutes * 6)
        samples: dict[int, list[tuple[float, float, int]]] = {i: [] for i in range(len(daemons))}  # (s, RSS MB, FDs)
        next_sample = t_start + EARLY
        start_redactor: list[str | None] = []
        fired: Counter[str] = Counter()
        feed = 0

        async def keep_alive() -> None:
            """A daemon that exited on its own is a crash: count it, keep its log, restart it."""
            while True:
                await trio.sleep(1)
                for i, d in enumerate(daemons):
                    if not d.alive() and not d.ended_by_test:
                        crashes.append(f"replica {i} exit {d.proc.poll()} at {time.monotonic() - t_start:.0f} s: {d.tail(800)!r}")
                        d.ended_by_test = True
                        daemons[i] = await w.start("ollama", STATE_DIR=str(workdir / f"state{i}"), **env)
                        samples[i] = []  # a replaced replica starts its figures again

        async with trio.open_nursery() as n:
            n.start_soon(keep_alive)
            next_phase = time.monotonic()
            hostile = False
            while time.monotonic() < end_feed:
                now = time.monotonic()
                # the feed: bursts around --rate per second
                burst = rng.choice([0, 0, 1, 2]) * args.rate
                for _ in range(int(burst)):
                    o = w.offer_valid(1, text_size=rng.randint(20, 400), prefix=f"soak {feed}")[0]
                    text_of[o.key] = o.text or ""
                    feed += 1
                if now >= next_phase:
                    fired.update(st.stats()["faults_fired"])
                    fired.update({f"backend:{a.kind}": a.fired for a in fake.answers})
                    w.calm()
                    hostile = not hostile
                    if hostile:
                        mix = fault_mix(rng)
                        st.faults.update(mix["faults"])
                        fake.answers = mix["answers"]
                        fake.busy = mix["busy"]
                        st.token_answer = mix["token"]
                        if mix["revoke"]:
                            st.revoke_all()
                        if mix["redis"] and redis is not None:
                            redis.stop()
                            await trio.sleep(rng.uniform(0.5, 3.0))
                            redis.start()
                            redis.restarts += 1
                    next_phase = now + rng.uniform(5, 20)
                if now >= next_sample:
                    for i, d in enumerate(daemons):
                        samples[i].append((now - t_start, rss_mb(d.proc.pid), open_fds(d.proc.pid)))
                    next_sample += SAMPLE_EVERY
                    if not start_redactor and now - t_start >= warmup:
                        start_redactor = [await _redactor_size(d) for d in daemons]
                await trio.sleep(1)
            fired.update(st.stats()["faults_fired"])
            w.calm()
            feed_seconds = time.monotonic() - t_start
            drained = await w.wait_quiet(DRAIN_TIMEOUT, quiet_for=3)
            for i, d in enumerate(daemons):
                samples[i].append((time.monotonic() - t_start, rss_mb(d.proc.pid), open_fds(d.proc.pid)))
            end_redactor = [await _redactor_size(d) for d in daemons]
            leaks = []
            for d in daemons:
                leaks += await w.leaks(d)
            n.cancel_scope.cancel()
        states = w.states()
        succeeded = states.get("succeeded", 0)
        total_s = time.monotonic() - t_start
        units = w.units()
        overshoot = _worst_window(units, 60.0 - 0.5) - args.limit
        dup = sum(1 for v in st.results.values() if len(v) > 1)
        conflicting = sum(1 for v in st.callback_results.values() if len(v) > 1)
        failed = states.get("failed", 0)
        pending = states.get("pending", 0)
        for d in daemons:
            await d.stop(30)
    if redis is not None:
        redis.stop()
    lost = failed + pending + states.get("in_progress", 0) + len(st.wrong_results)
    if lost or crashes:  # keep the daemons' logs, and say what happened to each task not done
        with open(workdir / "not-done.txt", "w") as f:
            history: dict[str, list[str]] = {}
            for p in st.patches:
                history.setdefault(p.task_id, []).append(f"{p.state}@{p.at - wall_start:.1f}s")
            for key, t in st.tasks.items():
                if isinstance(t, dict) and t.get("state") != "succeeded":
                    f.write(f"{key} {t.get('state')}: {' '.join(history.get(key, []))}\n")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"soak: {args.minutes:g} min of faults, {args.replicas} replica(s){' + test-owned Redis' if redis else ' (SQLite)'}, "
          f"daemon from {DAEMON_SRC or 'this tree'}, seed {args.seed}")
    print(f"tasks offered: {feed}; succeeded {succeeded}, failed {failed}, pending {pending}, in_progress {states.get('in_progress', 0)}"
          f"; drained: {drained} ({total_s - feed_seconds:.0f} s after the feed stopped)")
    print(f"tasks/s: {succeeded / total_s:.2f} over {total_s:.0f} s (feed about {args.rate * 0.75:.1f}/s; limit {args.limit}/min)")
    print(f"lost: {lost} (failed {failed}, never done {pending}, wrong results {len(st.wrong_results)})"
          + (f"; daemon logs and each task's PATCHes kept in {workdir}" if lost or crashes else ""))
    print(f"stuck: {states.get('in_progress', 0)}")
    print(f"crashes: {len(crashes)}" + "".join(f"\n  {c}" for c in crashes[:5]))
    print(f"duplicates: {dup} tasks reported succeeded more than once; conflicting results: {conflicting}")
    print(f"limit overshoot: {max(0, overshoot)} (worst 60 s window {overshoot + args.limit} units at a limit of {args.limit})")
    for i, rows in samples.items():
        print(f"replica {i}: " + _growth(rows, warmup))
    if any(r is not None for r in end_redactor):
        print("redactor size (processor_redactor_secrets, secret values held): " + ", ".join(
            f"replica {i} {start_redactor[i] if i < len(start_redactor) else '?'} -> {r}" for i, r in enumerate(end_redactor))
            + " (after warm-up -> end)")
    else:
        print("redactor size: not exposed by the daemon (needs a metric, e.g. processor_redactor_secrets)")
    print(f"faults fired: {dict(fired)}; token requests {st.token_requests}; tokens issued {len(st.issued)}; "
          f"backend statuses {dict(fake.statuses)}; redis restarts {redis.restarts if redis else 0}")
    print(f"secrets seen: {leaks or 'none'}")


def _growth(rows: list[tuple[float, float, int]], warmup: float) -> str:
    """RSS and FDs: each the median of 5 samples (2.5 min) from the end of warm-up, and of the
    last 5 samples, so that one burst or one keep-alive connection more or less at the instant
    of a sample does not decide; with the single figures at 20 s, at warm-up, at the end, and
    the peak."""
    if not rows:
        return "no figures"
    after = [r for r in rows if r[0] >= warmup] or rows[-1:]
    base, last = after[:5], rows[-5:]
    b_rss, e_rss = statistics.median(r[1] for r in base), statistics.median(r[1] for r in last)
    b_fd, e_fd = statistics.median(r[2] for r in base), statistics.median(r[2] for r in last)
    first, w, end = rows[0], after[0], rows[-1]
    peak = max(r[1] for r in rows)
    return (f"RSS {b_rss:.1f} -> {e_rss:.1f} MB ({_pct(b_rss, e_rss)}; medians of 5 samples from {base[0][0]:.0f} s and of "
            f"the last 5 to {end[0]:.0f} s; single figures {first[1]:.1f} at {first[0]:.0f} s, {w[1]:.1f} at {w[0]:.0f} s, "
            f"{end[1]:.1f} at the end, peak {peak:.1f}), open FDs {b_fd:g} -> {e_fd:g} ({_pct(b_fd, e_fd)}; single figures "
            f"{first[2]}, {w[2]}, {end[2]}; most {max(r[2] for r in rows)})")


async def _redactor_size(d: Daemon) -> str | None:
    """The daemon's `processor_redactor_secrets` (how many secret values its log redactor holds)."""
    r = await d.get("/metrics")
    m = re.search(r"^processor_redactor_secrets\s+([0-9.e+]+)$", r.text, re.M) if r is not None else None
    return f"{float(m.group(1)):g}" if m else None


def _right(result: Any, text: str | None) -> bool:
    if text is None or not isinstance(result, list) or len(result) != OLLAMA_DIM:
        return False
    want = expected_vector(LOCAL_MODEL, text, OLLAMA_DIM, openai=False)
    return all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(result, want, strict=True))


def _worst_window(times: list[float], span: float) -> int:
    worst = j = 0
    for i, t in enumerate(times):
        while times[j] < t - span:
            j += 1
        worst = max(worst, i - j + 1)
    return worst


def _pct(a: float, b: float) -> str:
    return f"{(b - a) / a * 100:+.1f} %" if a and a > 0 and not math.isnan(a) else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--rate", type=float, default=6.0, help="tasks per second in a burst (average about 0.75x)")
    ap.add_argument("--limit", type=int, default=400, help="RATE_LIMIT_PER_MINUTE")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="a daemon setting on top of the soak's (repeatable), e.g. MEMORY_TRIM_INTERVAL_SECONDS=0")
    ap.add_argument("--memstats", metavar="DIR", default=None, help="each daemon's memory figures every 30 s, to DIR/<pid>.jsonl")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds before the growth figures' baseline (default: a tenth of the run, at most 300)")
    trio.run(soak, ap.parse_args())


if __name__ == "__main__":
    main()


