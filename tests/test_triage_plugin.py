"""A task type registered from a separate package (tests/plugin_pkg), found through the
`processor.task_types` entry-point group of its own (temporary) distribution metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from processor.config import load_settings
from processor.kinds import Computed, Content, Defect, KindPorts, Work, registry
from processor.wiring import build_chat_backends

PLUGIN_SRC = Path(__file__).parent / "plugin_pkg"


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """What `pip install` of the plug-in leaves behind: its code on the path and a
    dist-info with the entry point."""
    dist = tmp_path / "processor_language_kind-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: processor-language-kind\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text('[processor.task_types]\ndefining_language = processor_language_kind:make\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    yield


def settings():
    return load_settings({"API_BASE_URL": "http://api", "OAUTH2_TOKEN_URL": "http://api/t", "OAUTH2_CLIENT_ID": "c",
                          "OAUTH2_CLIENT_SECRET": "s", "PROCESSING_MODE": "mock"}, dotenv_path=None)[0]


def test_without_the_plugin_the_type_is_unknown():
    assert "defining_language" not in registry.available()
    with pytest.raises(registry.RegistryError, match="unknown task type"):
        registry.load(settings(), ["defining_language"])


async def test_a_plugin_type_is_registered_and_runs(installed_plugin):
    assert registry.available()["defining_language"] == "processor_language_kind:make"
    s = settings()
    kinds = registry.load(s)
    assert {"text_embedding", "identifying_data", "defining_language"} <= set(kinds)
    kind = kinds["defining_language"]
    assert isinstance(kind.parse("bare"), Defect)
    content = kind.parse({"text": "Bom dia, Brasil", "model": "o3"})
    assert isinstance(content, Content)
    backend, model = kind.route(content)  # type: ignore[attr-defined]
    ports = KindPorts(chat=build_chat_backends(s, CollectorRegistry()))
    (out,) = await kind.compute(ports, [Work("b" * 24, kind.type, content.text, model, backend, content.params)])
    assert isinstance(out, Computed) and out.result["language"] in ("pt", "en", "es", "other")


async def test_the_daemon_runs_a_plugin_type_against_the_sandbox(installed_plugin, sandbox, tmp_path):
    from processor.daemon import Daemon
    from tests.conftest import make_settings, running, wait_until

    task = sandbox.state.create({"type": "defining_language", "content": {"text": "Bom dia, Brasil", "model": "o3"},
                                 "callbackRoute": "verification_update_language", "callbackParams": {"targetId": "c" * 24, "field": "language"}})
    bad = sandbox.state.create({"type": "defining_language", "content": "a bare string"})
    async with running(Daemon(make_settings(sandbox, tmp_path))):
        await wait_until(lambda: all(sandbox.state.tasks[t["_id"]]["state"] in ("succeeded", "failed") for t in (task, bad)))
    done = sandbox.state.tasks[task["_id"]]
    assert done["state"] == "succeeded" and done["result"]["language"] in ("pt", "en", "es", "other")
    assert sandbox.state.tasks[bad["_id"]]["state"] == "failed"
