"""The alert rules and the dashboard on real data: a real Prometheus (Debian's package)
scrapes a real daemon (`python -m processor run`, hybrid mode against a stand-in for
OpenAI and Ollama) working on the sandbox task API.

The rules are `deploy/prometheus/alerts.yml` with every `for:`, range window and
threshold in seconds divided by SCALE; nothing else changes. Each scenario brings about an
alert's condition the way production would (the task API down, reports failing, every
backend down, failing tasks, the daemon killed, its target gone), waits for the alert to
fire on `/api/v1/alerts`, undoes the cause and waits for it to resolve. Waiting is polling
with generous deadlines: on a busy machine the test gets slower, not flaky.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.procs import (
    ROOT,
    Proc,
    create_tasks,
    daemon_env,
    free_port,
    sandbox_fault,
    sandbox_states,
    start_daemon,
    start_fake_embeddings,
    start_sandbox,
    wait_for,
)

pytestmark = pytest.mark.slow

SCALE = 40  # 10m -> 15 s, 15m -> 22.5 s, "> 600" seconds -> "> 15"
RULES = ROOT / "deploy/prometheus/alerts.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/processor.json"
SCRAPE_SECONDS = 1
FIRE_TIMEOUT = 240.0
RATE_LIMIT_PER_HOUR = 600
SECONDS_THRESHOLDS = (600, 900)  # literal ages in the rules' expressions


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("Prometheus is not installed: `apt-get install -y prometheus` (Debian's package; CI installs it in .ci/run)")
    return path


def _duration_ms(text: str) -> int:
    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
    total = 0
    for value, unit in re.findall(r"(\d+)(ms|s|m|h)", text):
        total += int(value) * units[unit]
    assert total > 0, text
    return total


def scaled_rules(text: str, scale: int = SCALE) -> tuple[str, dict[str, str]]:
    """The rules with time scaled down; also returns each rule's scaled expression."""
    doc = yaml.safe_load(text)
    exprs = {}
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["for"] = f"{max(1000, _duration_ms(rule['for']) // scale)}ms"
            expr = re.sub(r"\[(\d+[smh])\]", lambda m: f"[{max(5000, _duration_ms(m[1]) // scale)}ms]", rule["expr"])
            expr = re.sub(r"> (\d+)\b", lambda m: f"> {int(m[1]) / scale:g}" if int(m[1]) in SECONDS_THRESHOLDS else m[0], expr)
            rule["expr"] = exprs[rule["alert"]] = expr
    return yaml.safe_dump(doc, sort_keys=False), exprs


class Prometheus:
    def __init__(self, tmp: Path, rules_text: str, targets: list[str]) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.targets_file = tmp / "targets.json"
        self.set_targets(targets)
        (tmp / "alerts.yml").write_text(rules_text)
        config = {
            "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "scrape_timeout": f"{SCRAPE_SECONDS}s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp / "alerts.yml")],
            "scrape_configs": [{"job_name": "processor", "file_sd_configs": [{"files": [str(self.targets_file)], "refresh_interval": "1s"}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        check = subprocess.run(["promtool", "check", "config", str(tmp / "prometheus.yml")], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = Proc("prometheus", [prometheus_binary(), f"--config.file={tmp / 'prometheus.yml'}",
                                        f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                         log=tmp / "prometheus.log")
        wait_for("Prometheus to be ready", lambda: self._alive() and httpx.get(f"{self.url}/-/ready", timeout=5).status_code == 200)

    def _alive(self) -> bool:
        if not self.proc.alive():
            raise AssertionError(f"prometheus exited:\n{self.proc.log()}")
        return True

    def set_targets(self, targets: list[str]) -> None:
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": targets, "labels": {}}] if targets else []))
        tmp.replace(self.targets_file)

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return list(body["data"]["result"])

    def alerts(self, name: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/alerts", timeout=10)
        return [a for a in r.json()["data"]["alerts"] if a["labels"].get("alertname") == name]

    def wait_firing(self, name: str, hint: str, **labels: str) -> dict[str, Any]:
        def firing() -> dict[str, Any] | None:
            for a in self.alerts(name):
                if a["state"] == "firing" and all(a["labels"].get(k) == v for k, v in labels.items()):
                    return a
            return None

        try:
            return wait_for(f"alert {name}{labels or ''} to fire ({hint})", firing, timeout=FIRE_TIMEOUT, interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nalerts now: {self.alerts(name)}") from None

    def wait_resolved(self, name: str, **labels: str) -> None:
        def gone() -> bool:
            return not any(all(a["labels"].get(k) == v for k, v in labels.items()) for a in self.alerts(name))

        wait_for(f"alert {name}{labels or ''} to resolve", gone, timeout=FIRE_TIMEOUT, interval=0.5)

    def stop(self) -> None:
        self.proc.stop()


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_scaled_rules_keep_every_rule_and_scale_every_duration() -> None:
    original = yaml.safe_load(RULES.read_text())
    text, exprs = scaled_rules(RULES.read_text())
    scaled = yaml.safe_load(text)
    names = [r["alert"] for g in original["groups"] for r in g["rules"]]
    assert [r["alert"] for g in scaled["groups"] for r in g["rules"]] == names
    for expr in exprs.values():
        assert not re.search(r"\[\d+m\]", expr), expr
        assert not re.search(r"> (600|900)\b", expr), expr
    assert {"ProcessorDown", "ProcessorMissing", "ProcessorCircuitBreakerOpen", "ProcessorHighFailureRatio", "ProcessorQuotaExhausted",
            "ProcessorBacklogGrowingNothingProcessed", "ProcessorOutboxNotDraining", "ProcessorNoSuccessfulPoll"} <= set(names)


@pytest.fixture
def stack(tmp_path: Path):
    procs: list[Any] = []
    try:
        sandbox, sb_url = start_sandbox(tmp_path, seed=0)
        procs.append(sandbox)
        fake, fake_url = start_fake_embeddings(tmp_path)
        procs.append(fake)
        metrics_port = free_port()
        env = daemon_env(
            sb_url, tmp_path / "state", metrics_port,
            PROCESSING_MODE="hybrid", OPENAI_API_KEY="sk-test-0000000000000000", OPENAI_BASE_URL=f"{fake_url}/v1",
            OLLAMA_BASE_URL=fake_url, SUPPORTED_MODELS='["nomic-embed-text"]', DEFAULT_MODEL="nomic-embed-text",
            RATE_LIMIT_ENABLED="true", RATE_LIMIT_PER_HOUR=str(RATE_LIMIT_PER_HOUR), CIRCUIT_BREAKER_THRESHOLD="3",
            MAX_RETRIES="1", OLLAMA_MAX_RETRIES="1", RETRY_MAX_DELAY_SECONDS="2", OLLAMA_TIMEOUT="10", OPENAI_TIMEOUT="10",
        )
        daemon = start_daemon(tmp_path, env)
        procs.append(daemon)
        rules, exprs = scaled_rules(RULES.read_text())
        (tmp_path / "prom").mkdir()
        prom = Prometheus(tmp_path / "prom", rules, [f"127.0.0.1:{metrics_port}"])
        procs.append(prom)
        yield {"sandbox": sb_url, "fake": fake_url, "daemon": daemon, "env": env, "prom": prom, "exprs": exprs,
               "target": f"127.0.0.1:{metrics_port}", "tmp": tmp_path, "procs": procs}
    finally:
        for p in reversed(procs):
            p.stop()


def _backend_fault(fake_url: str, **faults: str | None) -> None:
    httpx.post(f"{fake_url}/_fault", json=faults, timeout=10).raise_for_status()


def _done(sb: str) -> int:
    s = sandbox_states(sb)
    return s.get("succeeded", 0) + s.get("failed", 0)


def _seed(sb: str, n: int, model: str | None = None) -> None:
    httpx.post(f"{sb}/_sandbox/seed", json={"count": n, "model": model}, timeout=10).raise_for_status()


def test_every_alert_fires_and_resolves_on_real_scrapes(stack: dict[str, Any]) -> None:
    prom: Prometheus = stack["prom"]
    sb, fake = stack["sandbox"], stack["fake"]
    wait_for("the daemon to be scraped", lambda: prom.query('up{job="processor"} == 1'), timeout=60)

    # --- baseline: work for both backends is processed ------------------------------------
    _seed(sb, 20, "nomic-embed-text")
    _seed(sb, 20, "text-embedding-3-small")
    wait_for("40 tasks done", lambda: _done(sb) >= 40, timeout=120)

    # --- failing tasks: a high failure ratio (tasks keep arriving, most are malformed) ----
    def failing_traffic() -> bool:
        create_tasks(sb, [None, None, None, {"text": "a fine claim", "model": "nomic-embed-text"}])
        return bool([a for a in prom.alerts("ProcessorHighFailureRatio") if a["state"] == "firing"])

    wait_for("ProcessorHighFailureRatio to fire (3 of 4 new tasks are malformed)", failing_traffic, timeout=FIRE_TIMEOUT, interval=1.0)
    prom.wait_resolved("ProcessorHighFailureRatio")

    # Every dashboard query has data by now (throughput, latency, failures, tokens of both
    # backends, batch sizes, breakers, rate-limit tiers, outbox, poller state).
    missing = []
    for title, expr in dashboard_queries():
        try:
            wait_for(f"dashboard query {expr}", lambda expr=expr: prom.query(expr), timeout=30)
        except AssertionError:
            missing.append(f"{title}: {expr}")
    assert not missing, "dashboard queries without data:\n" + "\n".join(missing)

    # --- reports failing: results wait in the outbox ---------------------------------------
    sandbox_fault(sb, route="patch", status=503, only_state="succeeded")
    _seed(sb, 5, "nomic-embed-text")
    prom.wait_firing("ProcessorOutboxNotDraining", "every result PATCH answers 503")
    sandbox_fault(sb, route="patch", clear=True)
    prom.wait_resolved("ProcessorOutboxNotDraining")

    # --- the task API down: no successful poll, its breaker stays not-closed ---------------
    sandbox_fault(sb, route="pending", status=503)
    prom.wait_firing("ProcessorNoSuccessfulPoll", "GET pending answers 503")
    prom.wait_firing("ProcessorCircuitBreakerOpen", "the task API breaker opens and half-opens", service="task_api")
    sandbox_fault(sb, route="pending", clear=True)
    prom.wait_resolved("ProcessorNoSuccessfulPoll")
    prom.wait_resolved("ProcessorCircuitBreakerOpen", service="task_api")

    # --- every backend down (OpenAI out of quota, Ollama unreachable) while work arrives ----
    _backend_fault(fake, openai="quota", ollama="down")

    def arriving() -> bool:
        _seed(sb, 2, "nomic-embed-text")
        _seed(sb, 2, "text-embedding-3-small")
        return bool([a for a in prom.alerts("ProcessorBacklogGrowingNothingProcessed") if a["state"] == "firing"])

    wait_for("ProcessorBacklogGrowingNothingProcessed to fire (every backend down, tasks arriving)", arriving,
             timeout=FIRE_TIMEOUT, interval=2.0)
    prom.wait_firing("ProcessorQuotaExhausted", "OpenAI answers 429 insufficient_quota", backend="openai")
    prom.wait_firing("ProcessorCircuitBreakerOpen", "Ollama's connections break", service="ollama")
    _backend_fault(fake, openai=None, ollama=None)
    prom.wait_resolved("ProcessorBacklogGrowingNothingProcessed")
    prom.wait_resolved("ProcessorQuotaExhausted")
    prom.wait_resolved("ProcessorCircuitBreakerOpen")
    wait_for("the backlog drained", lambda: sandbox_states(sb).get("pending", 0) == 0, timeout=180)

    # --- rate limit exhausted: the poller idles on purpose; neither critical alert fires ---
    _seed(sb, RATE_LIMIT_PER_HOUR, "nomic-embed-text")
    wait_for("the poller to pause for the rate limit", lambda: prom.query('processor_intake_paused{reason="rate_limited"} == 1'), timeout=120)
    no_poll_condition = stack["exprs"]["ProcessorNoSuccessfulPoll"].split("\n")[0].split(" unless ")[0]
    wait_for("no poll for longer than the (scaled) threshold", lambda: prom.query(no_poll_condition), timeout=120)
    observed_until = time.monotonic() + 15  # several evaluations past the scaled `for:`
    while time.monotonic() < observed_until:
        for name in ("ProcessorNoSuccessfulPoll", "ProcessorBacklogGrowingNothingProcessed"):
            assert not prom.alerts(name), f"{name} fires while the poller waits for the rate limit: {prom.alerts(name)}"
        assert prom.query('processor_intake_paused{reason="rate_limited"} == 1'), "the rate-limit pause ended early"
        time.sleep(1)

    # --- the daemon dies: ProcessorDown; it comes back: resolved ---------------------------
    daemon: Proc = stack["daemon"]
    daemon.stop(signal.SIGKILL)
    prom.wait_firing("ProcessorDown", "the daemon was killed", instance=stack["target"])
    restarted = start_daemon(stack["tmp"], stack["env"], name="daemon-restarted")
    stack["procs"].append(restarted)
    prom.wait_resolved("ProcessorDown")

    # --- no target at all: ProcessorMissing ---------------------------------------------------
    prom.set_targets([])
    prom.wait_firing("ProcessorMissing", "no processor target")
    prom.set_targets([stack["target"]])
    prom.wait_resolved("ProcessorMissing")
