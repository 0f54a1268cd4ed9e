"""Metrics: what the tasks hold (their `content.model`) never grows the label sets without bound.

(One focused regression test per defect of issue 11 that can be seen from outside: the
daemon runs as its own process against the sandbox and the fake embedding server, over HTTP
only; each fails on a6a26dd. `HOSTILE_DAEMON_SRC=<tree>/src` runs another tree's daemon.)
"""

from __future__ import annotations

import trio

from processor.sandbox.harness import (
    REMOTE_MODEL,
    model_label_values,
)


async def test_task_models_never_grow_the_metric_labels_without_bound(world):
    world.fake.known_models = [REMOTE_MODEL]
    for i in range(30):
        o = world.offer_valid(1, model=f"model-{i:02d}-" + "x" * 150)[0]
        o.expect = "stay"
    d = await world.start("openai")
    with trio.fail_after(120):
        while world.fake.requests < 30 and sum(1 for r in world.fake.received) < 30:
            await trio.sleep(0.2)
            if not d.alive():
                break
    await trio.sleep(2)
    r = await d.get("/metrics")
    assert r is not None
    labels = model_label_values(r.text)
    long = [v for v in labels if len(v) > 128]
    assert len(labels) <= 20 and not long, f"{len(labels)} model label values ({len(long)} over 128 characters) from task content"
