"""Check that the deployment files wire up, beyond what their schemas say.

Kubernetes (deploy/kubernetes/*.yaml):
- each workload's selector matches its own pod template's labels;
- each Service selects the pods of some workload in these files;
- each StatefulSet's `serviceName` is a headless Service (clusterIP: None) selecting its pods;
- each in-cluster host named in a URL (ConfigMap data, container env: `http://ollama:11434`,
  `redis://redis:6379/0`) is a Service defined here;
- each ConfigMap referenced by `envFrom`/`configMapRef` is defined here.

Compose (docker-compose.yml):
- each profile starts exactly the workers it names (workers: services running the
  processor daemon), and no worker starts without a profile;
- no `env_file` is required to exist (a first run needs no hand edits).

`python deploy/check_wiring.py` prints every problem and exits 1 if there is one.
"""

from __future__ import annotations

import glob
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
# compose: which workers each profile must start (and nothing else).
EXPECTED_WORKERS: dict[str, set[str]] = {
    "": set(),
    "single": {"processor"},
    "sandbox": {"processor-sandbox"},
    "replicas": {"processor-replica"},
}
URL_HOST = re.compile(r"^[a-z][a-z0-9+.-]*://(?:[^@/]*@)?([^:/?#]+)")


def _matches(selector: dict[str, str] | None, labels: dict[str, str] | None) -> bool:
    return bool(selector) and all((labels or {}).get(k) == v for k, v in (selector or {}).items())


def _containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    yield from spec.get("initContainers", []) or []
    yield from spec.get("containers", []) or []


def check_kubernetes(docs: Iterable[dict[str, Any]]) -> list[str]:
    docs = [d for d in docs if d]
    problems: list[str] = []
    services = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Service"}
    config_maps = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}
    workloads = [d for d in docs if d.get("kind") in WORKLOADS]
    pod_labels = {f"{w['kind']}/{w['metadata']['name']}": w["spec"]["template"]["metadata"].get("labels", {}) for w in workloads}
    for w in workloads:
        ref = f"{w['kind']}/{w['metadata']['name']}"
        selector = w["spec"].get("selector", {}).get("matchLabels")
        if w["kind"] != "Job" and not _matches(selector, pod_labels[ref]):
            problems.append(f"{ref}: selector {selector} does not match its pod labels {pod_labels[ref]}")
        if w["kind"] == "StatefulSet":
            name = w["spec"].get("serviceName")
            svc = services.get(name or "")
            if svc is None:
                problems.append(f"{ref}: serviceName {name!r} is not a Service defined here")
            else:
                if svc["spec"].get("clusterIP") != "None":
                    problems.append(f"{ref}: its serviceName {name!r} is not headless (clusterIP: None)")
                if not _matches(svc["spec"].get("selector"), pod_labels[ref]):
                    problems.append(f"{ref}: its serviceName {name!r} selects {svc['spec'].get('selector')}, not its pods {pod_labels[ref]}")
        for c in _containers(w):
            for src in c.get("envFrom", []) or []:
                cm = (src.get("configMapRef") or {}).get("name")
                if cm and cm not in config_maps:
                    problems.append(f"{ref}: envFrom ConfigMap {cm!r} is not defined here")
            for e in c.get("env", []) or []:
                problems += _host_problems(f"{ref} env {e.get('name')}", e.get("value"), services)
    for name, svc in services.items():
        selector = svc["spec"].get("selector")
        if svc["spec"].get("type") == "ExternalName":
            continue
        if not any(_matches(selector, labels) for labels in pod_labels.values()):
            problems.append(f"Service/{name}: selector {selector} matches no pod template defined here")
    for name, cm in config_maps.items():
        for key, value in (cm.get("data") or {}).items():
            problems += _host_problems(f"ConfigMap/{name} {key}", value, services)
    return problems


def _host_problems(where: str, value: Any, services: dict[str, Any]) -> list[str]:
    if not isinstance(value, str):
        return []
    m = URL_HOST.match(value)
    if m is None:
        return []
    host = m.group(1)
    if "." in host or host in ("localhost",):  # a DNS name outside the namespace, an IP
        return []
    return [] if host in services else [f"{where}: {value!r} names host {host!r}, which no Service here defines"]


def started_services(compose: dict[str, Any], profiles: set[str]) -> set[str]:
    """Services `docker compose --profile P... up` starts: those without profiles, those in
    an active profile, and what they depend on."""
    services = compose["services"]
    start = {n for n, s in services.items() if not s.get("profiles") or set(s["profiles"]) & profiles}
    todo = list(start)
    while todo:
        deps = services[todo.pop()].get("depends_on") or {}
        for dep in deps if isinstance(deps, (list, dict)) else []:
            if dep not in start:
                start.add(dep)
                todo.append(dep)
    return start


def is_worker(service: dict[str, Any]) -> bool:
    command = service.get("command") or ["run"]
    return service.get("image", "").startswith("processor") and (command[:1] == ["run"])


def check_compose(compose: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    services = compose["services"]
    workers = {n for n, s in services.items() if is_worker(s)}
    for profile, expected in EXPECTED_WORKERS.items():
        got = started_services(compose, {profile} if profile else set()) & workers
        label = f"--profile {profile}" if profile else "no profile"
        if got != expected:
            problems.append(f"compose {label} starts workers {sorted(got)}, expected {sorted(expected)}")
    for name, s in services.items():
        entries = s.get("env_file") or []
        for e in [entries] if isinstance(entries, (str, dict)) else entries:
            path, required = (e, True) if isinstance(e, str) else (e.get("path"), e.get("required", True))
            if required and not (ROOT / str(path)).exists():
                problems.append(f"compose service {name}: env_file {path} is required but missing (use required: false)")
    return problems


def main() -> int:
    docs: list[dict[str, Any]] = []
    for path in sorted(glob.glob(str(ROOT / "deploy/kubernetes/*.yaml"))):
        docs += [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    problems = check_kubernetes(docs)
    problems += check_compose(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))
    for p in problems:
        print(f"wiring: {p}")
    if not problems:
        print(f"wiring: ok ({len(docs)} Kubernetes objects, compose profiles {sorted(k for k in EXPECTED_WORKERS if k)})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
