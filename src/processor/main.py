"""Command line: `python -m processor [run|check|sandbox|demo|limits]`.

Exit status: 0 success; 1 a run-time failure (a check failed, start-up error); 2 bad
configuration or usage (one message listing every problem, never a traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import trio

import processor
from processor.config import ConfigError, Settings, load_settings

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="processor", description="Worker daemon for AI tasks (text embeddings).")
    p.add_argument("--version", action="version", version=f"processor {processor.__version__}")
    p.add_argument("--env-file", default=".env", help="dotenv file read under the real environment (default: .env)")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("run", help="run the daemon (the default)", description="Run the daemon until SIGTERM/SIGINT.")
    sub.add_parser("check", help="validate configuration and try each dependency once",
                   description="Validate the configuration, then try the token endpoint, the task API and the "
                               "embedding backend once each; one line per check; non-zero exit if any fails.")
    sb = sub.add_parser("sandbox", help="run the sandbox task API on loopback",
                        description="Serve a local stand-in for the task API and OAuth2 server.")
    sb.add_argument("--host", default="127.0.0.1")
    sb.add_argument("--port", type=int, default=8080)
    sb.add_argument("--seed", type=int, default=0, help="pending tasks to create at start")
    sb.add_argument("--malformed", action="store_true", help="also seed one malformed entry of each kind")
    sb.add_argument("--token-lifetime", type=float, default=3600.0, help="seconds a token stays valid")
    sb.add_argument("--text-size", type=int, default=60, help="characters of text per seeded task")
    dm = sub.add_parser("demo", help="sandbox + daemon end to end, with a summary",
                        description="Start the sandbox, seed tasks, run the real daemon against it until every task "
                                    "is done, print a summary.")
    dm.add_argument("--tasks", type=int, default=200)
    dm.add_argument("--malformed", action="store_true", help="also seed one malformed entry of each kind")
    dm.add_argument("--claims", type=int, default=3, help="claims then run through the whole triage chain (0: skip)")
    sub.add_parser("limits", help="print rate-limit usage from the store", description="Print each tier's usage from the store without starting the daemon.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    if command == "sandbox":
        return _sandbox(args)
    if command == "demo":
        return _demo(args)
    try:
        settings, warnings = load_settings(dotenv_path=args.env_file)
    except ConfigError as exc:
        print(f"processor: {exc.render()}", file=sys.stderr)
        return EXIT_CONFIG
    if command == "check":
        return _check(settings, warnings)
    if command == "limits":
        return _limits(settings)
    return _run(settings, warnings)


def _run(settings: Settings, warnings: list[str]) -> int:
    from processor.daemon import StartupError
    from processor.effects.logs import configure_logging, get_logger

    configure_logging(settings.log_level, settings.log_format.value)
    log = get_logger("main")
    for w in warnings:
        log.warning("configuration_warning", message=w)
    from processor import wiring

    wiring.install_fallback_handlers()  # until the daemon's receiver is in place, and after it
    try:
        return trio.run(wiring.run, settings)
    except StartupError as exc:
        log.error("startup_failed", error=str(exc))
        return EXIT_FAIL
    finally:
        # the shutdown is over: a late SIGTERM/SIGINT (an impatient supervisor) is ignored by
        # the kernel, so the interpreter's own exit can never be cut to "killed by signal"
        wiring.ignore_signals()


# --- check --------------------------------------------------------------------------


def _check(settings: Settings, warnings: list[str]) -> int:
    for w in warnings:
        print(f"warning: {w}")
    print("configuration: OK")
    results = trio.run(_check_async, settings)
    for name, ok, detail in results:
        print(f"{name}: {'OK' if ok else 'FAIL'}" + (f" — {detail}" if detail else ""))
    return EXIT_OK if all(ok for _, ok, _ in results) else EXIT_FAIL


async def _check_async(settings: Settings) -> list[tuple[str, bool, str]]:
    from processor.effects.metrics import Metrics
    from processor.wiring import build_backends, routing_for
    metrics = Metrics()
    out = await _check_token_and_api(settings, metrics)
    backends = build_backends(settings, metrics)
    routing = routing_for(settings)
    for b, adapter in backends.items():
        try:
            ok, detail = await _check_backend(settings, routing, b, adapter)
        except Exception as exc:
            ok, detail = False, str(exc)
        finally:
            await adapter.aclose()
        out.append((f"{b.value} backend", ok, detail))
    out += await _check_chat(settings, metrics)  # the chat model of each triage type
    return out


async def _check_chat(settings: Settings, metrics: Any) -> list[tuple[str, bool, str]]:
    """The chat model of every triage type this worker runs, asked once."""
    from processor.kinds import registry
    from processor.kinds.base import KindPorts
    from processor.kinds.triage import TriageKind
    from processor.pure import triage
    from processor.pure.faults import DependencyError
    from processor.wiring import build_chat_backends

    wanted = [t for t in triage.TRIAGE_TYPES if not settings.task_types or t in settings.task_types]
    if not wanted:
        return []
    ports = KindPorts(chat=build_chat_backends(settings, metrics))
    out: list[tuple[str, bool, str]] = []
    try:
        kinds = registry.load(settings, wanted)
        for name, kind in kinds.items():
            assert isinstance(kind, TriageKind)
            try:
                out.append((f"{name} chat model", True, f"{await kind.check(ports)} (template {kind.template.version})"))
            except DependencyError as exc:
                out.append((f"{name} chat model", False, str(exc)))
    finally:
        for chat in ports.chat.values():
            await chat.aclose()
    return out


async def _check_token_and_api(settings: Settings, metrics: Any) -> list[tuple[str, bool, str]]:
    import httpx

    from processor.effects.api import ApiError, TaskApi
    from processor.effects.auth import TokenError, TokenProvider
    from processor.effects.guard import Guard
    from processor.pure.breaker import BreakerConfig
    from processor.wiring import token_config

    out: list[tuple[str, bool, str]] = []
    api_check = "task API (GET /api/ai-tasks/pending)"
    async with httpx.AsyncClient(timeout=settings.request_timeout) as http:
        tokens = TokenProvider(http, token_config(settings), metrics=metrics, guard=Guard("token", BreakerConfig()))
        try:
            await tokens.get()
            out.append(("token endpoint", True, settings.oauth2_token_url))
        except TokenError as exc:
            out.append(("token endpoint", False, str(exc)))
        if not tokens.has_token:
            return [*out, (api_check, False, "skipped: no token")]
        api = TaskApi(http, settings.api_base_url, tokens, metrics=metrics, guard=Guard("api", BreakerConfig()), concurrency=1)
        try:
            async with api.pending() as entries:
                first = await anext(aiter(entries), None)
            out.append((api_check, True, "reachable" + (", tasks pending" if first is not None else ", nothing pending")))
        except ApiError as exc:
            hint = " — check API_BASE_URL" if exc.status == 404 or exc.status is None else ""
            out.append((api_check, False, f"{exc}{hint}"))
    return out


async def _check_backend(settings: Settings, routing: Any, b: Any, adapter: Any) -> tuple[bool, str]:
    """Ollama: the models are there (pulled if need be); others: a probe has the configured size."""
    from processor.effects.backends.ollama import OllamaBackend

    if isinstance(adapter, OllamaBackend):
        problems = await adapter.check_models()
        if problems:
            return False, "; ".join(problems)
        return True, f"models ready: {', '.join(settings.supported_models)}"
    model = settings.default_model if routing.backend_for(settings.default_model) is b else "text-embedding-3-small"
    probe = await adapter.embed(model, ["probe"])
    got = len(probe.vectors[0]) if probe.vectors else 0
    want = settings.embedding_dimensions
    if got != want:
        return False, (f"{model} returns {got}-dimension vectors, EMBEDDING_DIMENSIONS is {want}: set "
                       f"EMBEDDING_DIMENSIONS={got} if the task API stores {got}-dimension vectors, else use a "
                       f"model or server that gives {want}")
    return True, f"embedded a probe with {model}: {got} dimensions"


# --- limits -----------------------------------------------------------------------------


def _limits(settings: Settings) -> int:
    from processor.effects.limiter import LimiterError, build_limiter, format_usage
    from processor.wiring import limiter_configs

    if not settings.rate_limit_enabled:
        print("rate limiting is off (RATE_LIMIT_ENABLED=false)")
        return EXIT_OK
    if not (settings.rate_limits.enabled() or settings.token_limits.enabled() or settings.spend_limits.enabled()):
        print("no rate-limit tier is set (RATE_LIMIT_PER_*, RATE_LIMIT_TOKENS_PER_* and SPEND_LIMIT_PER_* are all 0)")
        return EXIT_OK
    if settings.state_backend.value == "redis":
        from processor.effects.redis_state import print_redis_limits

        return trio.run(print_redis_limits, settings.redis_url, settings.redis_key_prefix, limiter_configs(settings)[0])
    try:
        limiter = build_limiter(limiter_configs(settings)[0], settings.rate_limit_storage_path, metrics=None)
    except LimiterError as exc:
        print(f"processor: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"store: {settings.rate_limit_storage_path}  strategy: {settings.rate_limit_strategy.value}  zone: {settings.rate_limit_timezone}")
    print("\n".join(format_usage(limiter.usage())))
    return EXIT_OK


# --- sandbox -----------------------------------------------------------------------------


def _sandbox(args: argparse.Namespace) -> int:
    from processor.sandbox import SandboxApp, SandboxState, serve_asgi

    state = SandboxState(token_lifetime=args.token_lifetime)
    if args.seed:
        state.seed(args.seed, text_size=args.text_size)
    if args.malformed:
        state.seed_malformed()

    async def serve() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as n:
            url = await n.start(lambda task_status: serve_asgi(SandboxApp(state), args.host, args.port, shutdown=stop, task_status=task_status))
            print(f"sandbox task API listening on {url}", flush=True)
            print("use these settings:", flush=True)
            print(f"  API_BASE_URL={url}\n  OAUTH2_TOKEN_URL={url}/oauth2/token", flush=True)
            print(f"  OAUTH2_CLIENT_ID={state.client_id}\n  OAUTH2_CLIENT_SECRET={state.client_secret}", flush=True)
            with trio.open_signal_receiver(2, 15) as signals:
                async for _ in signals:
                    stop.set()
                    break

    trio.run(serve)
    return EXIT_OK


# --- demo ---------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from processor.effects.logs import configure_logging

    configure_logging(os.environ.get("LOG_LEVEL", "WARNING"), os.environ.get("LOG_FORMAT", "console"), stream=sys.stderr)
    code = trio.run(_demo_async, args.tasks, args.malformed)
    if args.claims and code == EXIT_OK:
        from processor.triage_demo import demo_chain

        code = trio.run(demo_chain, args.claims)
    return code


async def _demo_async(n_tasks: int, malformed: bool) -> int:
    from processor.daemon import Daemon
    from processor.effects.backends.local import DEMO_CLAIMS, local_available
    from processor.sandbox import SandboxApp, SandboxState, serve_asgi

    # With the `local` extra installed, a real model (wordllama) and claims worth comparing.
    mode = os.environ.get("PROCESSING_MODE") or ("local" if local_available() else "mock")
    state = SandboxState()
    claims = {state.create({"type": "text_embedding", "content": c})["_id"]: c for c in DEMO_CLAIMS[:n_tasks]} if mode == "local" else {}
    state.seed(n_tasks - len(claims), text_size=200)
    bad = state.seed_malformed() if malformed else {}
    stop = trio.Event()
    with tempfile.TemporaryDirectory(prefix="processor-demo-") as tmp:
        async with trio.open_nursery() as n:
            url = await n.start(lambda task_status: serve_asgi(SandboxApp(state), "127.0.0.1", 0, shutdown=stop, task_status=task_status))
            try:
                settings, _ = load_settings(_demo_env(mode, url, state, tmp), dotenv_path=None)
            except ConfigError as exc:
                print(exc.render(), file=sys.stderr)
                stop.set()
                return EXIT_CONFIG
            print(f"sandbox at {url} with {n_tasks} pending tasks" + (f" and {len(bad) + 1} malformed entries" if bad else ""))
            print(f"running the daemon: mode={settings.processing_mode.value}, batch={settings.max_batch_size}, concurrency={settings.concurrency_limit}")
            target = n_tasks + len(bad) - 1 if bad else n_tasks  # the unknown-type task stays pending
            elapsed = await _drive(Daemon(settings), state, target)
            stop.set()
    print()
    return _demo_summary(state, n_tasks, elapsed, claims, malformed=bool(bad))


def _demo_env(mode: str, url: str, state: Any, state_dir: str) -> dict[str, str]:
    return {
        "PROCESSING_MODE": mode,
        "POLLING_INTERVAL_SECONDS": "1",
        "METRICS_PORT": "0",
        "METRICS_HOST": "127.0.0.1",
        "RATE_LIMIT_ENABLED": "false",
        **{k: v for k, v in os.environ.items() if k in _DEMO_PASSTHROUGH},
        "API_BASE_URL": url,
        "OAUTH2_TOKEN_URL": f"{url}/oauth2/token",
        "OAUTH2_CLIENT_ID": state.client_id,
        "OAUTH2_CLIENT_SECRET": state.client_secret,
        "STATE_DIR": state_dir,
    }


async def _drive(daemon: Any, state: Any, target: int) -> float:
    """Run `daemon` until `target` tasks are final (or 120 s), showing progress; the seconds taken."""
    t0 = time.perf_counter()
    async with trio.open_nursery() as dn:
        dn.start_soon(daemon.run)
        while True:
            await trio.sleep(0.25)
            counts = state.by_state()
            done = counts.get("succeeded", 0) + counts.get("failed", 0)
            print(f"\r  pending {counts.get('pending', 0):>6}  in_progress {counts.get('in_progress', 0):>6}  "
                  f"succeeded {counts.get('succeeded', 0):>6}  failed {counts.get('failed', 0):>6}", end="", flush=True)
            if done >= target and counts.get("in_progress", 0) == 0:
                break
            if time.perf_counter() - t0 > 120:
                print("\ndemo: timed out after 120 s", file=sys.stderr)
                break
        elapsed = time.perf_counter() - t0
        daemon.stop()
    return elapsed


def _demo_summary(state: Any, n_tasks: int, elapsed: float, claims: dict[str, str], *, malformed: bool) -> int:
    counts = state.by_state()
    sample = next((t for t in state.tasks.values() if isinstance(t, dict) and t.get("state") == "succeeded"), None)
    vec: list[Any] = sample.get("result", []) if sample else []
    print("summary")
    for k in ("succeeded", "failed", "pending", "in_progress"):
        print(f"  {k:<12} {counts.get(k, 0)}")
    print(f"  throughput   {n_tasks / elapsed:.1f} tasks/s ({elapsed:.2f} s)")
    if vec:
        print(f"  sample vector: {len(vec)} dimensions, L2 norm {math.sqrt(sum(x * x for x in vec)):.6f}")
    if claims:
        _print_neighbours(state, claims)
    if malformed:
        print("  (2 malformed entries stay pending by design: one has no _id, so it cannot be reported;\n"
              "   one has a task type this processor does not run, left for a worker that does)")
    stays_pending = 2 if malformed else 0
    ok = counts.get("succeeded", 0) >= n_tasks and counts.get("in_progress", 0) == 0 and counts.get("pending", 0) == stays_pending
    return EXIT_OK if ok else EXIT_FAIL


def _print_neighbours(state: Any, claims: dict[str, str]) -> None:
    from processor.effects.backends.local import DEMO_CLAIMS, DEMO_QUERIES, nearest_neighbours

    vectors = {text: state.tasks[tid].get("result") for tid, text in claims.items() if state.tasks[tid].get("state") == "succeeded"}
    print("nearest neighbours by cosine similarity (local model), among the demo claims:")
    for i in DEMO_QUERIES:
        if i >= len(DEMO_CLAIMS) or not vectors.get(DEMO_CLAIMS[i]):
            continue
        query = DEMO_CLAIMS[i]
        print(f"  {query}")
        for score, text in nearest_neighbours(vectors[query], [(t, v) for t, v in vectors.items() if t != query and v]):
            print(f"    {score:.2f}  {text}")


_DEMO_PASSTHROUGH = {
    "PROCESSING_MODE", "OPENAI_API_KEY", "OPENAI_BASE_URL", "OLLAMA_BASE_URL", "SUPPORTED_MODELS", "DEFAULT_MODEL",
    "EMBEDDING_DIMENSIONS", "MAX_BATCH_SIZE", "CONCURRENCY_LIMIT", "API_CONCURRENCY", "LOG_LEVEL",
}


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
