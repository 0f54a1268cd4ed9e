"""Configuration: names and defaults of the original service, new settings, and one clear
message listing every problem."""

from __future__ import annotations

import pytest

from processor.config import AuthMethod, ConfigError, Mode, StateBackend, load_settings
from processor.pure.ratelimit import Strategy

BASE = {
    "API_BASE_URL": "https://api.example.com/",
    "ORY_PROJECT_SLUG": "happy-curie-123",
    "OAUTH2_CLIENT_ID": "cid",
    "OAUTH2_CLIENT_SECRET": "topsecret-value",
    "OPENAI_API_KEY": "sk-test-abcdefghijklmnop",
}


def load(**env):
    return load_settings({**BASE, **env}, dotenv_path=None)


def problems(**env) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load(**env)
    return {p.name: str(p) for p in info.value.problems}


def test_defaults_match_the_original_service():
    s, warnings = load()
    assert warnings == []
    assert s.api_base_url == "https://api.example.com"
    assert s.processing_mode is Mode.OPENAI
    assert s.oauth2_token_url == "https://happy-curie-123.projects.oryapis.com/oauth2/token"
    assert (s.polling_interval_seconds, s.concurrency_limit, s.max_retries, s.retry_backoff_factor) == (30, 5, 3, 2.0)
    assert (s.request_timeout, s.openai_timeout, s.circuit_breaker_threshold, s.metrics_port) == (30, 60, 5, 8001)
    assert (s.ollama_base_url, s.ollama_timeout, s.ollama_max_retries, s.ollama_model_download_timeout) == ("http://localhost:11434", 120, 3, 600)
    assert s.supported_models == ("nomic-embed-text", "dengcao/Qwen3-Embedding-0.6B:Q8_0")
    assert s.oauth2_scope == "read write" and s.oauth2_auth_method is AuthMethod.BASIC
    assert s.rate_limit_enabled and s.rate_limit_strategy is Strategy.ROLLING and s.rate_limit_timezone == "UTC"
    assert s.rate_limits.enabled() == {}
    assert s.embedding_dimensions == 1024 and s.default_model == "text-embedding-3-small"
    assert s.shutdown_grace_seconds == 25 and s.state_dir == "data"
    assert s.rate_limit_storage_path == "data/rate_limits.db"
    assert (s.api_concurrency, s.max_batch_size, s.batch_max_wait_ms, s.max_task_attempts) == (8, 64, 50, 5)
    assert s.state_backend is StateBackend.SQLITE


def test_default_model_follows_the_mode():
    s, _ = load(PROCESSING_MODE="ollama")
    assert s.default_model == "nomic-embed-text"
    s, _ = load(PROCESSING_MODE="hybrid", SUPPORTED_MODELS='["a","b"]')
    assert s.default_model == "a"
    s, _ = load(PROCESSING_MODE="ollama", SUPPORTED_MODELS="x, y", DEFAULT_MODEL="y")
    assert s.supported_models == ("x", "y") and s.default_model == "y"


def test_rate_limits_and_state_dir():
    s, _ = load(RATE_LIMIT_PER_MINUTE="20", RATE_LIMIT_PER_MONTH="1000", RATE_LIMIT_STRATEGY="fixed",
                RATE_LIMIT_TIMEZONE="Europe/Berlin", STATE_DIR="/var/lib/p")
    assert s.rate_limits.enabled() == {"minute": 20, "month": 1000}
    assert s.rate_limit_strategy is Strategy.FIXED and s.rate_limit_storage_path == "/var/lib/p/rate_limits.db"


def test_explicit_token_url_and_post_auth():
    s, _ = load(OAUTH2_TOKEN_URL="https://auth.internal/realms/x/protocol/openid-connect/token", OAUTH2_AUTH_METHOD="client_secret_post")
    assert s.oauth2_token_url.startswith("https://auth.internal/") and s.oauth2_auth_method is AuthMethod.POST


def test_secrets_from_files(tmp_path):
    (tmp_path / "secret").write_text("from-file-secret\n")
    (tmp_path / "key").write_text("  sk-from-file-key-123456  ")
    env = {**BASE, "OAUTH2_CLIENT_SECRET_FILE": str(tmp_path / "secret"), "OPENAI_API_KEY_FILE": str(tmp_path / "key")}
    del env["OAUTH2_CLIENT_SECRET"], env["OPENAI_API_KEY"]
    s, _ = load_settings(env, dotenv_path=None)
    assert s.oauth2_client_secret == "from-file-secret" and s.openai_api_key == "sk-from-file-key-123456"
    bad = {**env, "OAUTH2_CLIENT_SECRET_FILE": str(tmp_path / "missing")}
    with pytest.raises(ConfigError) as info:
        load_settings(bad, dotenv_path=None)
    assert "OAUTH2_CLIENT_SECRET_FILE" in info.value.render()


def test_dotenv_file_is_read_and_real_environment_wins(tmp_path):
    f = tmp_path / ".env"
    f.write_text("CONCURRENCY_LIMIT=9\nPOLLING_INTERVAL_SECONDS=7\n")
    s, _ = load_settings({**BASE, "CONCURRENCY_LIMIT": "3"}, dotenv_path=f)
    assert s.concurrency_limit == 3 and s.polling_interval_seconds == 7


def test_placeholder_key_switches_to_mock_with_a_warning():
    s, warnings = load(OPENAI_API_KEY="your_openai_api_key_here")
    assert s.processing_mode is Mode.MOCK and s.mock_from_placeholder_key
    assert warnings and "MOCK" in warnings[0]


def test_openai_or_hybrid_without_a_key_is_an_error_never_mock():
    env = {k: v for k, v in BASE.items() if k != "OPENAI_API_KEY"}
    for mode in ("openai", "hybrid"):
        with pytest.raises(ConfigError) as info:
            load_settings({**env, "PROCESSING_MODE": mode}, dotenv_path=None)
        assert "OPENAI_API_KEY" in info.value.render()
    s, _ = load_settings({**env, "PROCESSING_MODE": "ollama"}, dotenv_path=None)
    assert s.processing_mode is Mode.OLLAMA


def test_every_problem_is_listed_at_once_with_secrets_masked():
    env = {
        "API_BASE_URL": "not a url",
        "CONCURRENCY_LIMIT": "0",
        "PROCESSING_MODE": "gpu",
        "SUPPORTED_MODELS": '{"a": 1}',
        "RATE_LIMIT_TIMEZONE": "Mars/Olympus",
        "OAUTH2_CLIENT_SECRET": "hunter2-secret",
        "REDIS_URL": "redis://u:pw-123@host:6379",
        "STATE_BACKEND": "redis",
    }
    with pytest.raises(ConfigError) as info:
        load_settings(env, dotenv_path=None)
    text = info.value.render()
    names = {p.name for p in info.value.problems}
    assert {"API_BASE_URL", "CONCURRENCY_LIMIT", "PROCESSING_MODE", "SUPPORTED_MODELS", "RATE_LIMIT_TIMEZONE",
            "OAUTH2_TOKEN_URL", "OAUTH2_CLIENT_ID"} <= names
    assert "hunter2-secret" not in text and "pw-123" not in text
    assert "'not a url'" in text and "expected" in text


@pytest.mark.parametrize(
    ("name", "value"),
    [("API_BASE_URL", "ftp://x"), ("CONCURRENCY_LIMIT", "abc"), ("CONCURRENCY_LIMIT", "0"), ("PROCESSING_MODE", "fast"),
     ("SUPPORTED_MODELS", "[1, 2]"), ("SUPPORTED_MODELS", "[]"), ("RATE_LIMIT_TIMEZONE", "Nowhere/City"),
     ("RATE_LIMIT_PER_MINUTE", "-1"), ("METRICS_PORT", "70000"), ("LOG_LEVEL", "LOUD"), ("RATE_LIMIT_STRATEGY", "sliding"),
     ("FALLBACK_MODELS", "[1]"), ("RATE_LIMIT_ENABLED", "maybe")],
)
def test_each_bad_value_is_named(name, value):
    found = problems(**{name: value})
    assert name in found and repr(value) in found[name]


def test_missing_api_base_url_and_token_url():
    env = {k: v for k, v in BASE.items() if k not in ("API_BASE_URL", "ORY_PROJECT_SLUG")}
    with pytest.raises(ConfigError) as info:
        load_settings(env, dotenv_path=None)
    names = {p.name for p in info.value.problems}
    assert names == {"API_BASE_URL", "OAUTH2_TOKEN_URL"}


def test_settings_are_immutable():
    s, _ = load()
    with pytest.raises(AttributeError):
        s.concurrency_limit = 10  # type: ignore[misc]


def test_env_example_lists_every_setting():
    from pathlib import Path

    from processor.config import _FIELDS, _PERIODS

    text = (Path(__file__).resolve().parents[1] / ".env.example").read_text()
    names = set(_FIELDS) | {"ORY_PROJECT_SLUG", "OAUTH2_CLIENT_SECRET", "OPENAI_API_KEY"}
    names |= {f"RATE_LIMIT_PER_{p}" for p in _PERIODS} | {f"OPENAI_RATE_LIMIT_PER_{p}" for p in _PERIODS}
    missing = sorted(n for n in names if f"\n{n}=" not in text and f"# {n}" not in text)
    assert missing == []


def test_failure_rate_breaker_settings():
    from processor.wiring import breaker_config

    s, _ = load(CIRCUIT_BREAKER_FAILURE_RATE="0.5", CIRCUIT_BREAKER_WINDOW="10")
    cfg = breaker_config(s)
    assert (cfg.window, cfg.rate_threshold, cfg.min_calls, cfg.threshold) == (10, 0.5, 5, 5)
    assert breaker_config(load()[0]).window == 0  # off by default: the original's rule only
    assert "CIRCUIT_BREAKER_FAILURE_RATE" in problems(CIRCUIT_BREAKER_FAILURE_RATE="2")
