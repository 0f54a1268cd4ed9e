"""A slow CPU embedding server (issue 11): the daemon measures it before it sizes requests.

The fake server computes one request at a time, 1 s per 2,000 characters, and computes a
request whose client gave up before the next one (`processor.sandbox.fake_backends`, slow
mode). Fixed sizes (batches of up to 64 at CONCURRENCY_LIMIT=5) pass the timeout there:
the abandoned work is computed anyway, everything behind it times out too, and tasks are
released and claimed again. The daemon runs as its own process with default settings
except a shorter OPENAI_TIMEOUT (20 s instead of 60 s), which shrinks the scale of the
problem (and of the test) without changing its shape.

What is asserted is work, not time: each text computed about once, no request abandoned,
two PATCHes per task, a clean exit. The time bounds are only there so a broken daemon
cannot hang the run (the server needs 24 s; they allow many times that).
"""

from __future__ import annotations

import signal

from processor.sandbox.fake_backends import SLOW_PER_CHAR, FakeBackendState
from processor.sandbox.harness import OPENAI_DIM, REMOTE_MODEL, assert_holds, event_names, hostile_world

TASKS = 48
CHARS = 1000  # half a second of the server's time each: 24 s for all


async def test_a_slow_cpu_server_is_measured_first_and_never_made_to_compute_abandoned_work(tmp_path):
    fake = FakeBackendState(base=0.0, per_input=0.0, dim=OPENAI_DIM, slow_per_char=SLOW_PER_CHAR)
    async with hostile_world(tmp_path, fake=fake) as w:
        w.offer_valid(TASKS, model=REMOTE_MODEL, text_size=CHARS)
        d = await w.start("openai", minimal=True, OPENAI_TIMEOUT="20", LOG_LEVEL="INFO")
        assert await w.wait_quiet(600, polls=0), f"not done: {w.states()}\n{d.tail(3000)}"
        await assert_holds(w, d, openai=True)
        sent = sum(fake.inputs.values())
        assert fake.computed_abandoned == 0, f"{fake.computed_abandoned} requests abandoned and still computed"
        assert sent <= TASKS * 1.1, f"{sent} inputs sent for {TASKS} texts (work re-sent after timeouts)"
        per_task = len(w.sandbox.patches) / TASKS
        assert per_task <= 2.2, f"{per_task:.2f} PATCHes per task (claims released and taken again)"
        sizes = [r["inputs"] for r in fake.received if r["model"] == REMOTE_MODEL]
        assert sizes and sizes[0] <= 2, f"the first request, before any measurement, was not small: {sizes}"
        d.signal(signal.SIGTERM)
        code = await d.wait_exit(25 + 30)  # SHUTDOWN_GRACE_SECONDS default, and room for a busy machine
        assert code == 0, d.tail(3000)
        assert w.states().get("in_progress", 0) == 0
        events = event_names(d.log_text())
        assert "adaptive_timeout" not in events and "batch_split" not in events
