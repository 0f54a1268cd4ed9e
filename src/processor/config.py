"""Settings: every knob comes from the environment (or a `.env` file), parsed once.

`load_settings(environ)` returns an immutable `Settings` or raises `ConfigError`, which
lists *every* problem found (name, the value given with secrets masked, what is expected).
Nothing here is global: the settings object is passed down explicitly.
"""

from __future__ import annotations

import enum
import json
import os
import re
import zoneinfo
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import cattrs

from processor.pure.budget import DEFAULT_PRICES, ModelPrice, parse_money, parse_price
from processor.pure.ratelimit import Strategy

# The placeholder the original service treated as "no key, use mock embeddings".
PLACEHOLDER_OPENAI_KEY = "your_openai_api_key_here"
DEFAULT_SUPPORTED_MODELS = ("nomic-embed-text", "dengcao/Qwen3-Embedding-0.6B:Q8_0")
# Where the Wikidata User-Agent points when WIKIDATA_CONTACT is not set.
PROJECT_URL = "https://github.com/AletheiaFact"  # the platform's organisation; confirm before a release
WIKIDATA_API_URL = "https://www.wikidata.org/w/api.php"
SECRET_NAMES = frozenset({"OAUTH2_CLIENT_SECRET", "OPENAI_API_KEY", "REDIS_URL"})


class Mode(enum.Enum):
    OPENAI = "openai"
    OLLAMA = "ollama"
    HYBRID = "hybrid"
    MOCK = "mock"
    LOCAL = "local"  # wordllama in-process (the `local` extra)


class AuthMethod(enum.Enum):
    BASIC = "client_secret_basic"
    POST = "client_secret_post"


class LogFormat(enum.Enum):
    JSON = "json"
    CONSOLE = "console"


class StateBackend(enum.Enum):
    SQLITE = "sqlite"
    REDIS = "redis"


@attrs.frozen
class Limits:
    """Per-period budgets; 0 means the tier is off."""

    minute: int = 0
    hour: int = 0
    day: int = 0
    week: int = 0
    month: int = 0

    def enabled(self) -> dict[str, int]:
        return {k: v for k, v in attrs.asdict(self).items() if v > 0}


@attrs.frozen
class Settings:
    api_base_url: str
    processing_mode: Mode = Mode.MOCK
    openai_api_key: str | None = attrs.field(default=None, repr=False)
    openai_base_url: str | None = None
    openai_timeout: float = 60.0
    openai_truncate: bool = False
    ollama_base_url: str = "http://localhost:11434"
    ollama_timeout: float = 120.0
    ollama_max_retries: int = 3
    ollama_model_download_timeout: float = 600.0
    ollama_keep_alive: str = "5m"
    ollama_truncate: bool = True
    supported_models: tuple[str, ...] = DEFAULT_SUPPORTED_MODELS
    default_model: str = "nomic-embed-text"
    embedding_dimensions: int = 1024
    fallback_models: dict[str, str] = attrs.field(factory=dict)
    mock_from_placeholder_key: bool = False
    mock_latency_ms: int = 0

    oauth2_token_url: str = ""
    oauth2_client_id: str = ""
    oauth2_client_secret: str = attrs.field(default="", repr=False)
    oauth2_scope: str = "read write"
    oauth2_auth_method: AuthMethod = AuthMethod.BASIC

    polling_interval_seconds: float = 30.0
    concurrency_limit: int = 5
    api_concurrency: int = 8
    intake_capacity: int = 256
    max_batch_size: int = 64
    batch_max_wait_ms: int = 50
    max_retries: int = 3
    retry_backoff_factor: float = 2.0
    retry_max_delay_seconds: float = 30.0
    max_task_attempts: int = 5
    request_timeout: float = 30.0
    circuit_breaker_threshold: int = 5
    circuit_breaker_failure_rate: float = 0.0  # 0: off; else open when this share of the window fails
    circuit_breaker_window: int = 20
    shutdown_grace_seconds: float = 25.0

    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8001
    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.JSON

    state_dir: str = "data"
    state_backend: StateBackend = StateBackend.SQLITE
    redis_url: str = attrs.field(default="redis://127.0.0.1:6379/0", repr=False)
    redis_key_prefix: str = "processor"
    lease_ttl_seconds: float = 30.0
    reclaim_interval_seconds: float = 300.0
    memory_trim_interval_seconds: float = 60.0
    reclaim_after_seconds: float = 600.0

    rate_limit_enabled: bool = True
    rate_limit_strategy: Strategy = Strategy.ROLLING
    rate_limit_storage_path: str = "data/rate_limits.db"
    rate_limit_timezone: str = "UTC"
    rate_limits: Limits = Limits()
    openai_rate_limits: Limits = Limits()
    token_limits: Limits = Limits()  # RATE_LIMIT_TOKENS_PER_*: input + output tokens
    spend_limits: Limits = Limits()  # SPEND_LIMIT_PER_{DAY,MONTH}, in nano-units of the prices' currency
    model_prices: dict[str, ModelPrice] = attrs.field(factory=lambda: dict(DEFAULT_PRICES))  # MODEL_PRICES

    # --- triage task types and chat models (issue 13) ------------------------------------
    task_types: tuple[str, ...] = ()  # TASK_TYPES; empty: every registered type
    model_map: dict[str, str] = attrs.field(factory=dict)  # chat model name -> model to ask instead
    output_language: str = "pt"
    prompts_dir: str | None = None
    chat_max_tokens: int = 8192  # per answer; reasoning tokens count (0: the model's default)
    chat_num_ctx: int = 8192  # Ollama context window for chat
    chat_bad_answer_retries: int = 2  # a bad answer is asked again this many times per claim
    wikidata_enabled: bool = True
    wikidata_api_url: str = WIKIDATA_API_URL
    wikidata_contact: str = PROJECT_URL
    wikidata_language: str = "pt"  # defaults to OUTPUT_LANGUAGE
    wikidata_timeout_seconds: float = 10.0  # enrichment of one result, all lookups together
    wikidata_cache_ttl_seconds: float = 7 * 86400.0

    @property
    def journal_path(self) -> str:
        return str(Path(self.state_dir) / "journal.db")


@attrs.frozen
class Problem:
    name: str
    given: str | None
    expected: str

    def __str__(self) -> str:
        given = "(not set)" if self.given is None else repr(self.given)
        return f"{self.name}={given}: expected {self.expected}"


class ConfigError(Exception):
    """The configuration is unusable; `problems` lists every reason, secrets masked."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"invalid configuration ({len(self.problems)} problem(s)):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def mask(name: str, value: str | None) -> str | None:
    if value is None or name not in SECRET_NAMES and not name.endswith("_SECRET"):
        return value
    if name == "REDIS_URL":
        return mask_url_password(value)
    return "***" if value else ""


def mask_url_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


# --- field parsers: each returns the parsed value or raises ValueError(expected) -----


def _url(v: str) -> str:
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("an http:// or https:// URL")
    return v.rstrip("/")


def _redis_url(v: str) -> str:
    if urlsplit(v).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("a redis:// or rediss:// URL")
    return v


def _int(minimum: int) -> Callable[[str], int]:
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise ValueError(f"an integer >= {minimum}") from None
        if n < minimum:
            raise ValueError(f"an integer >= {minimum}")
        return n

    return parse


def _float(minimum: float, *, strict: bool = False) -> Callable[[str], float]:
    what = f"a number {'>' if strict else '>='} {minimum:g}"

    def parse(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            raise ValueError(what) from None
        if x != x or x in (float("inf"),) or x < minimum or (strict and x == minimum):
            raise ValueError(what)
        return x

    return parse


def _rate(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise ValueError("a fraction between 0 and 1 (0 turns it off)") from None
    if not 0.0 <= x <= 1.0:
        raise ValueError("a fraction between 0 and 1 (0 turns it off)")
    return x


def _bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def _enum(cls: type[enum.Enum]) -> Callable[[str], Any]:
    def parse(v: str) -> Any:
        try:
            return cls(v.strip().lower())
        except ValueError:
            raise ValueError("one of " + " | ".join(m.value for m in cls)) from None

    return parse


def _models(v: str) -> tuple[str, ...]:
    text = v.strip()
    if text.startswith("[") or text.startswith("{") or text.startswith('"'):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("a JSON list of model names or a comma-separated list") from None
        if not isinstance(data, list) or not all(isinstance(m, str) and m.strip() for m in data):
            raise ValueError("a JSON list of model names or a comma-separated list")
        models = [m.strip() for m in data]
    else:
        models = [m.strip() for m in text.split(",") if m.strip()]
    if not models:
        raise ValueError("at least one model name")
    return tuple(models)


def _fallbacks(v: str) -> dict[str, str]:
    try:
        data = json.loads(v)
    except json.JSONDecodeError:
        raise ValueError('a JSON object like {"nomic-embed-text": "text-embedding-3-small"}') from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(t, str) and k and t for k, t in data.items()
    ):
        raise ValueError('a JSON object like {"nomic-embed-text": "text-embedding-3-small"}')
    return dict(data)


def _timezone(v: str) -> str:
    try:
        zoneinfo.ZoneInfo(v)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError("an IANA time zone name such as UTC or Europe/Berlin") from None
    return v


def _log_level(v: str) -> str:
    up = v.strip().upper()
    if up not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("DEBUG | INFO | WARNING | ERROR | CRITICAL")
    return up


def _nonempty(v: str) -> str:
    if not v.strip():
        raise ValueError("a non-empty value")
    return v.strip()


_GO_DURATION = re.compile(r"[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")


def _keep_alive(v: str) -> str:
    """What Ollama's duration parser accepts: whole seconds (`-1` keeps the model loaded,
    `0` unloads it) or a duration with units (`5m`, `1h30m`); sent as a number or a string."""
    text = v.strip()
    if re.fullmatch(r"[+-]?\d+", text) or _GO_DURATION.fullmatch(text):
        return text
    raise ValueError("whole seconds (-1 keeps the model loaded, 0 unloads it) or a duration such as 5m, 1h, 90s")


def _port(v: str) -> int:
    n = _int(0)(v)
    if n > 65535:
        raise ValueError("a TCP port 0-65535")
    return n


_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z]{2,4})?$")


def _task_types(v: str) -> tuple[str, ...]:
    names = [n.strip() for n in v.split(",") if n.strip()]
    if names == ["all"]:
        return ()
    if not names or not all(_TYPE_NAME.match(n) for n in names):
        raise ValueError("all, or a comma-separated list of task types such as text_embedding,identifying_data")
    return tuple(dict.fromkeys(names))


def _model_prices(v: str) -> dict[str, dict[str, int]]:
    expected = ('a JSON object of prices per 1M tokens, e.g. {"o3": {"input": 2.0, "output": 8.0}, '
                '"text-embedding-3-small": {"input": 0.02}}')
    try:
        data = json.loads(v)
    except json.JSONDecodeError:
        raise ValueError(expected) from None
    if not isinstance(data, dict):
        raise ValueError(expected)
    out: dict[str, dict[str, int]] = {}
    for model, price in data.items():
        if isinstance(price, (int, float, str)) and not isinstance(price, bool):
            price = {"input": price}
        if not model or not isinstance(price, dict) or not set(price) <= {"input", "output"} or "input" not in price:
            raise ValueError(expected)
        try:
            out[model] = {k: parse_price(x) for k, x in price.items() if not isinstance(x, bool)}
        except ValueError:
            raise ValueError(f"{expected}; prices are numbers >= 0") from None
        if len(out[model]) != len(price):
            raise ValueError(expected)
    return out


def _model_map(v: str) -> dict[str, str]:
    expected = "name=model pairs separated by commas (e.g. o3=qwen3:4b) or a JSON object"
    text = v.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(expected) from None
    else:
        data = {}
        for pair in text.split(","):
            if not pair.strip():
                continue
            name, sep, target = pair.partition("=")
            if not sep:
                raise ValueError(expected)
            data[name.strip()] = target.strip()
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(t, str) and k and t for k, t in data.items()):
        raise ValueError(expected)
    return dict(data)


def _language(v: str) -> str:
    if not _LANGUAGE.match(v.strip()):
        raise ValueError("a language code such as pt, en or pt-BR")
    return v.strip()


def _directory(v: str) -> str:
    if not Path(v).is_dir():
        raise ValueError("an existing directory")
    return v


# env name -> (settings field, parser). Defaults live on the Settings class.
_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "API_BASE_URL": ("api_base_url", _url),
    "PROCESSING_MODE": ("processing_mode", _enum(Mode)),
    "OPENAI_BASE_URL": ("openai_base_url", _url),
    "OPENAI_TIMEOUT": ("openai_timeout", _float(0, strict=True)),
    "OPENAI_TRUNCATE": ("openai_truncate", _bool),
    "OLLAMA_BASE_URL": ("ollama_base_url", _url),
    "OLLAMA_TIMEOUT": ("ollama_timeout", _float(0, strict=True)),
    "OLLAMA_MAX_RETRIES": ("ollama_max_retries", _int(0)),
    "OLLAMA_MODEL_DOWNLOAD_TIMEOUT": ("ollama_model_download_timeout", _float(0, strict=True)),
    "OLLAMA_KEEP_ALIVE": ("ollama_keep_alive", _keep_alive),
    "OLLAMA_TRUNCATE": ("ollama_truncate", _bool),
    "SUPPORTED_MODELS": ("supported_models", _models),
    "DEFAULT_MODEL": ("default_model", _nonempty),
    "EMBEDDING_DIMENSIONS": ("embedding_dimensions", _int(1)),
    "MOCK_LATENCY_MS": ("mock_latency_ms", _int(0)),
    "FALLBACK_MODELS": ("fallback_models", _fallbacks),
    "OAUTH2_TOKEN_URL": ("oauth2_token_url", _url),
    "OAUTH2_CLIENT_ID": ("oauth2_client_id", _nonempty),
    "OAUTH2_SCOPE": ("oauth2_scope", str.strip),
    "OAUTH2_AUTH_METHOD": ("oauth2_auth_method", _enum(AuthMethod)),
    "POLLING_INTERVAL_SECONDS": ("polling_interval_seconds", _float(0, strict=True)),
    "CONCURRENCY_LIMIT": ("concurrency_limit", _int(1)),
    "API_CONCURRENCY": ("api_concurrency", _int(1)),
    "INTAKE_CAPACITY": ("intake_capacity", _int(1)),
    "MAX_BATCH_SIZE": ("max_batch_size", _int(1)),
    "BATCH_MAX_WAIT_MS": ("batch_max_wait_ms", _int(0)),
    "MAX_RETRIES": ("max_retries", _int(0)),
    "RETRY_BACKOFF_FACTOR": ("retry_backoff_factor", _float(1)),
    "RETRY_MAX_DELAY_SECONDS": ("retry_max_delay_seconds", _float(0, strict=True)),
    "MAX_TASK_ATTEMPTS": ("max_task_attempts", _int(1)),
    "REQUEST_TIMEOUT": ("request_timeout", _float(0, strict=True)),
    "CIRCUIT_BREAKER_THRESHOLD": ("circuit_breaker_threshold", _int(1)),
    "CIRCUIT_BREAKER_FAILURE_RATE": ("circuit_breaker_failure_rate", _rate),
    "CIRCUIT_BREAKER_WINDOW": ("circuit_breaker_window", _int(2)),
    "SHUTDOWN_GRACE_SECONDS": ("shutdown_grace_seconds", _float(0)),
    "METRICS_HOST": ("metrics_host", _nonempty),
    "METRICS_PORT": ("metrics_port", _port),
    "LOG_LEVEL": ("log_level", _log_level),
    "LOG_FORMAT": ("log_format", _enum(LogFormat)),
    "STATE_DIR": ("state_dir", _nonempty),
    "STATE_BACKEND": ("state_backend", _enum(StateBackend)),
    "REDIS_URL": ("redis_url", _redis_url),
    "REDIS_KEY_PREFIX": ("redis_key_prefix", _nonempty),
    "LEASE_TTL_SECONDS": ("lease_ttl_seconds", _float(1)),
    "RECLAIM_INTERVAL_SECONDS": ("reclaim_interval_seconds", _float(1)),
    "RECLAIM_AFTER_SECONDS": ("reclaim_after_seconds", _float(0)),
    "MEMORY_TRIM_INTERVAL_SECONDS": ("memory_trim_interval_seconds", _float(0)),
    "RATE_LIMIT_ENABLED": ("rate_limit_enabled", _bool),
    "RATE_LIMIT_STRATEGY": ("rate_limit_strategy", _enum(Strategy)),
    "RATE_LIMIT_STORAGE_PATH": ("rate_limit_storage_path", _nonempty),
    "RATE_LIMIT_TIMEZONE": ("rate_limit_timezone", _timezone),
    "MODEL_PRICES": ("model_prices", _model_prices),
    # triage task types and chat models (issue 13)
    "TASK_TYPES": ("task_types", _task_types),
    "MODEL_MAP": ("model_map", _model_map),
    "OUTPUT_LANGUAGE": ("output_language", _language),
    "PROMPTS_DIR": ("prompts_dir", _directory),
    "CHAT_MAX_TOKENS": ("chat_max_tokens", _int(0)),
    "CHAT_NUM_CTX": ("chat_num_ctx", _int(0)),
    "CHAT_BAD_ANSWER_RETRIES": ("chat_bad_answer_retries", _int(0)),
    "WIKIDATA_ENABLED": ("wikidata_enabled", _bool),
    "WIKIDATA_API_URL": ("wikidata_api_url", _url),
    "WIKIDATA_CONTACT": ("wikidata_contact", _nonempty),
    "WIKIDATA_LANGUAGE": ("wikidata_language", _language),
    "WIKIDATA_TIMEOUT_SECONDS": ("wikidata_timeout_seconds", _float(0, strict=True)),
    "WIKIDATA_CACHE_TTL_SECONDS": ("wikidata_cache_ttl_seconds", _float(0)),
}
_PERIODS = ("MINUTE", "HOUR", "DAY", "WEEK", "MONTH")

_converter = cattrs.Converter()


def read_environment(environ: Mapping[str, str], dotenv_path: str | os.PathLike[str] | None) -> dict[str, str]:
    """The process environment over the `.env` file: a real variable wins."""
    merged: dict[str, str] = {}
    if dotenv_path is not None and Path(dotenv_path).is_file():
        from dotenv import dotenv_values

        merged.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    merged.update(environ)
    return merged


def _secret(env: Mapping[str, str], name: str, problems: list[Problem]) -> str | None:
    """A secret from NAME, or from the file named by NAME_FILE (content, trimmed)."""
    file_var = f"{name}_FILE"
    if env.get(file_var):
        try:
            return Path(env[file_var]).read_text(encoding="utf-8").strip()
        except OSError as exc:
            problems.append(Problem(file_var, env[file_var], f"a readable file ({exc.strerror})"))
            return None
    value = env.get(name)
    return value if value else None


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    dotenv_path: str | os.PathLike[str] | None = ".env",
) -> tuple[Settings, list[str]]:
    """Parse the environment. Returns (settings, warnings) or raises ConfigError."""
    env = read_environment(os.environ if environ is None else environ, dotenv_path)
    problems: list[Problem] = []
    warnings: list[str] = []
    values: dict[str, Any] = {}

    for name, (field, parse) in _FIELDS.items():
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[field] = parse(raw)
        except ValueError as exc:
            problems.append(Problem(name, mask(name, raw), str(exc)))

    for prefix, field in (("RATE_LIMIT_PER_", "rate_limits"), ("OPENAI_RATE_LIMIT_PER_", "openai_rate_limits")):
        limits: dict[str, int] = {}
        for period in _PERIODS:
            raw = env.get(prefix + period)
            if raw is None or raw == "":
                continue
            try:
                limits[period.lower()] = _int(0)(raw)
            except ValueError as exc:
                problems.append(Problem(prefix + period, raw, str(exc)))
        values[field] = limits

    for prefix, field, periods, parse in (("RATE_LIMIT_TOKENS_PER_", "token_limits", _PERIODS, _int(0)),
                                          ("SPEND_LIMIT_PER_", "spend_limits", ("DAY", "MONTH"), parse_money)):
        budget: dict[str, int] = {}
        for period in periods:
            raw = env.get(prefix + period)
            if raw is None or raw == "":
                continue
            try:
                budget[period.lower()] = parse(raw)
            except ValueError as exc:
                problems.append(Problem(prefix + period, raw, str(exc)))
        values[field] = budget

    if "api_base_url" not in values and not any(p.name == "API_BASE_URL" for p in problems):
        problems.append(Problem("API_BASE_URL", None, "the task API's base URL, e.g. https://api.example.com"))

    # Secrets (possibly from files).
    client_secret = _secret(env, "OAUTH2_CLIENT_SECRET", problems)
    api_key = _secret(env, "OPENAI_API_KEY", problems)
    values["oauth2_client_secret"] = client_secret or ""

    # OAuth2 token endpoint: explicit URL, or derived from the Ory project slug.
    slug = (env.get("ORY_PROJECT_SLUG") or "").strip()
    if "oauth2_token_url" not in values and not any(p.name == "OAUTH2_TOKEN_URL" for p in problems):
        if slug:
            values["oauth2_token_url"] = f"https://{slug}.projects.oryapis.com/oauth2/token"
        else:
            problems.append(
                Problem("OAUTH2_TOKEN_URL", None, "a token URL, or ORY_PROJECT_SLUG to derive it")
            )
    if "oauth2_client_id" not in values and not any(p.name == "OAUTH2_CLIENT_ID" for p in problems):
        problems.append(Problem("OAUTH2_CLIENT_ID", None, "the OAuth2 client id"))
    if not client_secret and not any(p.name.startswith("OAUTH2_CLIENT_SECRET") for p in problems):
        problems.append(Problem("OAUTH2_CLIENT_SECRET", None, "the OAuth2 client secret (or OAUTH2_CLIENT_SECRET_FILE)"))

    # Processing mode and the OpenAI key.
    mode = values.get("processing_mode")
    mode_given = "PROCESSING_MODE" in env and env["PROCESSING_MODE"] != ""
    if not mode_given:
        mode = Mode.OPENAI  # the original's default
    if api_key == PLACEHOLDER_OPENAI_KEY:
        api_key = None
        if mode in (Mode.OPENAI, None) or not mode_given:
            mode = Mode.MOCK
            values["mock_from_placeholder_key"] = True
            warnings.append(
                "OPENAI_API_KEY is the placeholder 'your_openai_api_key_here': using MOCK "
                "embeddings (fake vectors). Set PROCESSING_MODE=mock to say so explicitly, or "
                "give a real key."
            )
    if mode is not None:
        values["processing_mode"] = mode
    if mode in (Mode.OPENAI, Mode.HYBRID) and not api_key:
        problems.append(
            Problem("OPENAI_API_KEY", None, f"an OpenAI API key when PROCESSING_MODE={mode.value}")
        )
    values["openai_api_key"] = api_key

    # Defaults that depend on other settings.
    if "default_model" not in values and mode is not None:
        models = values.get("supported_models", DEFAULT_SUPPORTED_MODELS)
        values["default_model"] = "text-embedding-3-small" if mode is Mode.OPENAI else models[0]
    if mode is Mode.LOCAL and "embedding_dimensions" not in values:
        values["embedding_dimensions"] = 256  # the local model's size (64 and 128 by truncation)
    state_dir = values.get("state_dir", "data")
    if "rate_limit_storage_path" not in values:
        values["rate_limit_storage_path"] = str(Path(state_dir) / "rate_limits.db")
    if values.get("fallback_models") and mode is not Mode.HYBRID:
        warnings.append("FALLBACK_MODELS is only used in hybrid mode; ignoring it")
    if values.get("state_backend") is StateBackend.REDIS and "redis_url" not in values and not any(
        p.name == "REDIS_URL" for p in problems
    ):
        problems.append(Problem("REDIS_URL", None, "a redis:// URL when STATE_BACKEND=redis"))
    if values.get("shutdown_grace_seconds", 25.0) == 0:
        warnings.append("SHUTDOWN_GRACE_SECONDS=0: in-flight work is released at once on shutdown")

    # Triage: Wikidata's language follows the output language.
    if "wikidata_language" not in values and "output_language" in values:
        values["wikidata_language"] = values["output_language"]

    if problems:
        raise ConfigError(problems)
    return _converter.structure(values, Settings), warnings
