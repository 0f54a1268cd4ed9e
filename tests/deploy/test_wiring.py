"""deploy/check_wiring.py on the repository's manifests and compose file, and on copies
broken the way a6a26dd had them (each must be caught)."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_wiring", ROOT / "deploy/check_wiring.py")
assert _spec is not None and _spec.loader is not None
wiring = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wiring)


def k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((ROOT / "deploy/kubernetes").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_repository_files_wire_up() -> None:
    assert wiring.check_kubernetes(k8s_docs()) == []
    assert wiring.check_compose(compose()) == []
    out = subprocess.run([sys.executable, str(ROOT / "deploy/check_wiring.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_statefulset_whose_service_selects_other_pods_is_caught() -> None:
    docs = k8s_docs()
    find(docs, "StatefulSet", "processor-replicas")["spec"]["serviceName"] = "processor"
    problems = wiring.check_kubernetes(docs)
    assert any("processor-replicas" in p and "serviceName 'processor' selects" in p for p in problems), problems


def test_non_headless_governing_service_and_orphan_service_are_caught() -> None:
    docs = k8s_docs()
    del find(docs, "Service", "redis")["spec"]["clusterIP"]
    find(docs, "Service", "ollama")["spec"]["selector"] = {"app": "nothing"}
    problems = wiring.check_kubernetes(docs)
    assert any("StatefulSet/redis" in p and "headless" in p for p in problems), problems
    assert any(p.startswith("Service/ollama") for p in problems), problems


def test_url_to_an_undefined_service_is_caught() -> None:
    docs = [d for d in k8s_docs() if d["metadata"]["name"] not in ("ollama", "ollama-models")]
    problems = wiring.check_kubernetes(docs)
    assert any("OLLAMA_BASE_URL" in p and "'ollama'" in p for p in problems), problems


def test_profile_less_worker_and_required_env_file_are_caught() -> None:
    c = compose()
    broken = copy.deepcopy(c)
    del broken["services"]["processor"]["profiles"]
    broken["services"]["processor-replica"]["env_file"] = ".env"
    problems = wiring.check_compose(broken)
    assert any("--profile replicas starts workers ['processor', 'processor-replica']" in p for p in problems), problems
    assert any("env_file .env is required" in p for p in problems), problems
    assert wiring.started_services(c, {"replicas"}) >= {"redis", "processor-replica", "ollama", "ollama-pull", "prometheus", "alertmanager"}
    assert "processor" not in wiring.started_services(c, {"replicas"})
