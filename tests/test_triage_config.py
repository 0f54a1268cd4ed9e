"""Settings of the triage task types and chat models."""

from __future__ import annotations

import pytest

from processor.config import PROJECT_URL, WIKIDATA_API_URL, ConfigError, load_settings

BASE = {"API_BASE_URL": "http://api", "OAUTH2_TOKEN_URL": "http://api/t", "OAUTH2_CLIENT_ID": "c", "OAUTH2_CLIENT_SECRET": "s"}


def load(**env):
    return load_settings({**BASE, **env}, dotenv_path=None)


def test_defaults():
    s, warnings = load(PROCESSING_MODE="mock")
    assert warnings == []
    assert s.task_types == () and s.model_map == {} and s.output_language == "pt" and s.prompts_dir is None
    assert s.wikidata_api_url == WIKIDATA_API_URL and s.wikidata_contact == PROJECT_URL and s.wikidata_language == "pt"
    assert s.wikidata_cache_ttl_seconds == 7 * 86400 and s.wikidata_timeout_seconds > 0


def test_contact_warning_at_start_when_wikidata_is_really_called(tmp_path, captured_logs):
    from prometheus_client import CollectorRegistry

    from processor.effects.chat.metrics import chat_metrics
    from processor.effects.wikidata import MockWikidata, Wikidata
    from processor.wiring import build_wikidata

    def warned(**env):
        captured_logs.clear()
        s, _ = load(STATE_DIR=str(tmp_path), **env)
        built = build_wikidata(s, chat_metrics(CollectorRegistry()))
        return built, any(e["event"] == "wikidata_contact_not_set" for e in captured_logs)

    built, w = warned(PROCESSING_MODE="ollama")
    assert isinstance(built, Wikidata) and w
    assert warned(PROCESSING_MODE="ollama", WIKIDATA_CONTACT="ops@example.org")[1] is False
    assert warned(PROCESSING_MODE="ollama", WIKIDATA_ENABLED="false") == (None, False)
    built, w = warned(PROCESSING_MODE="mock")
    assert isinstance(built, MockWikidata) and not w


def test_values(tmp_path):
    s, _ = load(PROCESSING_MODE="hybrid", OPENAI_API_KEY="sk-x", TASK_TYPES="identifying_data, defining_severity",
                MODEL_MAP="o3=qwen3:4b, gpt-4o=llama3.2:3b", OUTPUT_LANGUAGE="en", PROMPTS_DIR=str(tmp_path),
                WIKIDATA_API_URL="http://127.0.0.1:9/w/api.php", WIKIDATA_TIMEOUT_SECONDS="2.5")
    assert s.task_types == ("identifying_data", "defining_severity")
    assert s.model_map == {"o3": "qwen3:4b", "gpt-4o": "llama3.2:3b"}
    assert s.output_language == "en" and s.wikidata_language == "en" and s.prompts_dir == str(tmp_path)
    assert s.wikidata_api_url == "http://127.0.0.1:9/w/api.php" and s.wikidata_timeout_seconds == 2.5
    assert load(PROCESSING_MODE="mock", MODEL_MAP='{"o3": "qwen3:4b"}')[0].model_map == {"o3": "qwen3:4b"}
    assert load(PROCESSING_MODE="mock", TASK_TYPES="all")[0].task_types == ()


def test_every_problem_is_listed(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(PROCESSING_MODE="mock", TASK_TYPES="Bad Type", MODEL_MAP="o3", OUTPUT_LANGUAGE="portuguese",
             PROMPTS_DIR=str(tmp_path / "missing"), WIKIDATA_TIMEOUT_SECONDS="0", WIKIDATA_API_URL="ftp://x")
    names = {p.name for p in err.value.problems}
    assert names == {"TASK_TYPES", "MODEL_MAP", "OUTPUT_LANGUAGE", "PROMPTS_DIR", "WIKIDATA_TIMEOUT_SECONDS", "WIKIDATA_API_URL"}
