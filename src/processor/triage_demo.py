"""`demo`, second part: claims through the whole triage chain, offline (mock mode).

The sandbox plays the platform (each accepted result creates the next tasks of the chain);
the daemon runs every type with the mock chat model and the mock Wikidata. Printed per
claim: the people with their Q-ids, the topics, the impact area and the severity.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
from typing import Any

import trio

from processor.config import ConfigError, load_settings
from processor.sandbox.world import World, make_world, serve_world

_PASSTHROUGH = {"OUTPUT_LANGUAGE", "PROMPTS_DIR", "MODEL_MAP", "LOG_LEVEL", "CONCURRENCY_LIMIT", "MOCK_LATENCY_MS"}


def describe(world: World) -> list[str]:
    """The per-claim lines of the summary."""
    lines = []
    for i, target in enumerate(world.chain.targets.values(), 1):
        r = target.results
        lines.append(f"claim {i}: {target.text}")
        people = r.get("identifiedData", {}).get("personalities", [])
        shown = ", ".join(f"{p['name']} ({p['wikidata']['id']})" if p.get("wikidata") else p["name"] for p in people)
        lines.append(f"  people      {shown or '(none named)'}")
        topics = r.get("topics") or []
        lines.append("  topics      " + (", ".join(f"{t['name']} ({t.get('wikidataId') or '-'})" for t in topics) or "(missing)"))
        area = r.get("impactArea")
        lines.append(f"  impact area {area['name'] + ' (' + (area.get('wikidataId') or '-') + ')' if area else '(missing)'}")
        severity = r.get("severity")
        level = severity.get("severity") if isinstance(severity, dict) else severity
        lines.append(f"  severity    {level or '(missing)'}")
    return lines


async def demo_chain(claims: int, *, timeout: float = 120.0) -> int:
    from processor.daemon import Daemon

    world = make_world()
    world.chain.seed(claims)
    stop = trio.Event()
    with tempfile.TemporaryDirectory(prefix="processor-demo-chain-") as tmp:
        async with trio.open_nursery() as n:
            await n.start(functools.partial(serve_world, world, "127.0.0.1", shutdown=stop))
            env: dict[str, Any] = {
                **{k: v for k, v in world.env().items() if k != "WIKIDATA_API_URL"},  # mock mode fakes Wikidata itself
                "PROCESSING_MODE": "mock", "POLLING_INTERVAL_SECONDS": "0.2", "METRICS_PORT": "0", "METRICS_HOST": "127.0.0.1",
                "RATE_LIMIT_ENABLED": "false", "STATE_DIR": tmp,
                **{k: v for k, v in os.environ.items() if k in _PASSTHROUGH},
            }
            try:
                settings, _ = load_settings(env, dotenv_path=None)
            except ConfigError as exc:
                print(exc.render(), file=sys.stderr)
                stop.set()
                return 2
            print(f"\ntriage chain: {claims} claims, each text_embedding -> identifying_data -> "
                  "(defining_topics, defining_impact_area) -> defining_severity (mock models, mock Wikidata)")
            daemon = Daemon(settings)
            t0 = time.perf_counter()
            async with trio.open_nursery() as dn:
                dn.start_soon(daemon.run)
                while world.chain.complete() < claims and time.perf_counter() - t0 < timeout:
                    await trio.sleep(0.1)
                elapsed = time.perf_counter() - t0
                daemon.stop()
            stop.set()
    print("\n".join(describe(world)))
    states = world.sandbox.by_state()
    refused = sum(world.chain.refused.values())
    print(f"chain summary: {world.chain.complete()}/{claims} claims complete in {elapsed:.1f} s; tasks "
          + ", ".join(f"{k} {v}" for k, v in sorted(states.items())) + f"; results refused {refused}")
    return 0 if world.chain.complete() == claims and refused == 0 and states.get("failed", 0) == 0 else 1
