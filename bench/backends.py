"""Backend requests per task and tasks/s through each backend, against a local fake server
with a latency model (20 ms per request + 1 ms per input; Ollama serves one request at a
time, as the real server does). The sandbox runs in its own process.

    python bench/backends.py [--tasks 2000]

The original service sent one backend request per task (1.0 requests/task).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from drain import SandboxProc  # noqa: E402

from processor.config import load_settings  # noqa: E402
from processor.daemon import Daemon  # noqa: E402
from processor.effects.logs import configure_logging  # noqa: E402
from processor.sandbox import serve_asgi  # noqa: E402
from processor.sandbox.fake_backends import FakeBackendState, FakeEmbeddings  # noqa: E402


async def one(mode: str, n: int, batch: int, concurrency: int) -> None:
    serial = mode == "ollama"
    fake = FakeBackendState(base=0.020, per_input=0.001, serial=serial, dim=768 if serial else 1024)
    sb = SandboxProc(0)
    model = "nomic-embed-text" if serial else "text-embedding-3-small"
    import httpx

    httpx.post(f"{sb.url}/_sandbox/seed", json={"count": n, "model": model, "text_size": 200}, timeout=60)
    stop = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(lambda task_status: serve_asgi(FakeEmbeddings(fake), "127.0.0.1", 0, shutdown=stop, task_status=task_status))
            with tempfile.TemporaryDirectory() as tmp:
                env = {"API_BASE_URL": sb.url, "OAUTH2_TOKEN_URL": f"{sb.url}/oauth2/token", "OAUTH2_CLIENT_ID": "sandbox-client",
                       "OAUTH2_CLIENT_SECRET": "sandbox-secret", "PROCESSING_MODE": mode, "STATE_DIR": tmp, "METRICS_PORT": "0",
                       "METRICS_HOST": "127.0.0.1", "RATE_LIMIT_ENABLED": "false", "MAX_BATCH_SIZE": str(batch),
                       "CONCURRENCY_LIMIT": str(concurrency), "OPENAI_API_KEY": "sk-bench-000000000000", "OPENAI_BASE_URL": url,
                       "OLLAMA_BASE_URL": url, "SUPPORTED_MODELS": "nomic-embed-text", "LOG_LEVEL": "WARNING"}
                settings, _ = load_settings(env, dotenv_path=None)
                daemon = Daemon(settings, health=None)
                async with trio.open_nursery() as dn:
                    dn.start_soon(daemon.run)
                    while True:
                        await trio.sleep(0.2)
                        stats = await trio.to_thread.run_sync(sb.stats)
                        if stats["states"].get("succeeded", 0) >= n:
                            break
                    daemon.stop()
            stop.set()
    finally:
        sb.close()
    seconds = stats["last_patch_at"] - stats["first_token_at"]
    per_req = batch
    ceiling = per_req / (fake.base + fake.per_input * per_req) * (1 if serial else concurrency)
    print(f"{mode:<7} {n} tasks: {fake.requests} backend requests = {fake.requests / n:.4f} requests/task "
          f"(target <= {1 / 32:.4f}; original 1.0); {n / seconds:.0f} tasks/s; "
          f"fake server ceiling at this batch size {ceiling:.0f} tasks/s; embedded twice: {sum(1 for v in fake.inputs.values() if v > 1)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=5)
    a = ap.parse_args()
    configure_logging("WARNING")
    import time

    from processor.effects.backends.mock import mock_vector

    t0 = time.perf_counter()
    for i in range(5000):
        mock_vector("m", f"claim {i}: some text to embed", 1024)
    print(f"mock    {5000 / (time.perf_counter() - t0):,.0f} vectors/s of 1,024 dimensions on one core (never the bottleneck)")
    for mode in ("openai", "ollama"):
        trio.run(one, mode, a.tasks, a.batch, a.concurrency)


if __name__ == "__main__":
    main()
