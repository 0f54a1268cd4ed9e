"""Prometheus metrics. Names of the original service are kept so dashboards keep working.

Every label is bounded: endpoints are route templates (`/api/ai-tasks/:id`), never ids;
reasons are enum values; a model gets its own label value only when the settings name it
(SUPPORTED_MODELS, DEFAULT_MODEL, FALLBACK_MODELS): a task's `content.model` is written by
whoever creates the task, so every other name is counted as `other` (`model_label`).

Labelled counters are created at zero for their known label values (`watch`), so
`increase()` and `rate()` see the first failures instead of a series that appears with them.

Some gauges are computed when Prometheus scrapes, from the running daemon's state, so they
never freeze while a stage is idle: the outbox's oldest result's age, the age of the backlog
figure, why the poller is idle (`processor_intake_paused{reason}`), and how many secret values
the log redactor holds (`processor_redactor_secrets`: a count, never a value). The daemon
registers its pipeline once with `Metrics.watch(pipeline, models=...)`.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

import processor
from processor.effects.logs import REDACTOR

if TYPE_CHECKING:
    from processor.board import Admission, BackendBoard
    from processor.book import Book
    from processor.effects.api import TaskApi
    from processor.effects.auth import TokenProvider
    from processor.pure.tasks import Routing
    from processor.runtime import StageConfig


class Watched(Protocol):
    """What the scrape-time gauges read of a running daemon (`processor.wiring.Pipeline`)."""

    @property
    def config(self) -> StageConfig: ...
    @property
    def routing(self) -> Routing: ...
    @property
    def book(self) -> Book: ...
    @property
    def board(self) -> BackendBoard: ...
    @property
    def admission(self) -> Admission: ...
    @property
    def api(self) -> TaskApi: ...
    @property
    def tokens(self) -> TokenProvider: ...
    @property
    def stopping(self) -> trio.Event: ...

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
AGE_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 300, 900, 3600, 4 * 3600, 86400)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

OTHER_MODEL = "other"
# Why the poller is not polling, each a value of processor_intake_paused{reason}.
PAUSE_REASONS = ("rate_limited", "intake_full", "api_breaker_open", "backends_down", "shutting_down")
TASK_STATUSES = ("succeeded", "failed")
REPORT_REJECT_STATUSES = (400, 404, 409, 410, 413, 422)
RELEASE_REASONS = (
    "shutdown", "recovered_at_start", "stale_claim", "lease_lost", "backend_down", "backend_unavailable",
    "backend_unreachable", "input_rejected", "timeout", "transient_failure",
)
# embedding_requests_total{outcome}: "success" or the adapters' Fault value
EMBED_OUTCOMES = ("success", "input", "parameter", "dimension", "model_missing", "auth", "quota", "rate_limited", "busy",
                  "server", "timeout", "unreachable", "malformed")
STAGES = ("taken", "claimed", "computed", "reported")


class _ModelCounter(Counter):
    """A Counter whose model-naming labels are passed through `Metrics.model_label`."""

    _model_label: Callable[[str], str] | None = None
    _model_positions: tuple[int, ...] = ()

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Any:
        bound = self._model_label
        if bound is not None:
            if labelvalues:
                labelvalues = tuple(bound(str(v)) if i in self._model_positions else v for i, v in enumerate(labelvalues))
            names = [self._labelnames[i] for i in self._model_positions]
            labelkwargs = {k: bound(str(v)) if k in names else v for k, v in labelkwargs.items()}
        return super().labels(*labelvalues, **labelkwargs)


class _StampedGauge(Gauge):
    """An unlabelled Gauge that remembers the wall time of its last `set`."""

    stamped_at: float | None = None

    def set(self, value: float) -> None:
        super().set(value)
        self.stamped_at = time.time()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, models: Iterable[str] | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self._models: frozenset[str] | None = None
        self._runtime: Watched | None = None

        def model_counter(name: str, doc: str, labels: list[str], model_labels: tuple[str, ...] = ("model",)) -> _ModelCounter:
            c = _ModelCounter(name, doc, labels, registry=r)
            c._model_label = self.model_label
            c._model_positions = tuple(labels.index(m) for m in model_labels)
            return c

        # --- kept from the original service ------------------------------------
        self.tasks_processed = Counter(
            "ai_tasks_processed_total", "Tasks finished, by type and final status", ["task_type", "status"], registry=r
        )
        self.task_duration = Histogram(
            "ai_task_processing_duration_seconds", "Claim to report, per task", buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge("ai_tasks_in_flight", "Tasks claimed and not yet reported", registry=r)
        self.api_requests = Counter(
            "api_requests_total", "Task API requests", ["endpoint", "method", "status_code"], registry=r
        )
        self.api_duration = Histogram(
            "api_request_duration_seconds", "Task API request latency", ["endpoint", "method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.openai_requests = model_counter("openai_requests_total", "OpenAI requests", ["model", "status"])
        self.openai_tokens = model_counter("openai_tokens_used_total", "OpenAI tokens", ["model", "type"])
        self.ollama_requests = model_counter("ollama_requests_total", "Ollama requests", ["model", "status"])
        self.ollama_tokens = model_counter("ollama_tokens_used_total", "Ollama tokens (estimated)", ["model", "type"])
        self.breaker_state = Gauge(
            "circuit_breaker_state", "0 closed, 1 open, 2 half-open", ["service"], registry=r
        )
        self.rl_usage = Gauge("rate_limit_current_usage", "Units used in the window", ["period"], registry=r)
        self.rl_max = Gauge("rate_limit_max_allowed", "Limit of the window", ["period"], registry=r)
        self.rl_remaining = Gauge("rate_limit_remaining", "Units left in the window", ["period"], registry=r)
        self.rl_exceeded = Counter(
            "rate_limit_exceeded_total", "Admissions refused (in part) by a tier", ["period"], registry=r
        )
        self.budget_used = Gauge("rate_limit_budget_used", "Tokens or spend (currency units) used in the window", ["metric", "period"], registry=r)
        self.budget_limit = Gauge("rate_limit_budget_limit", "Token or spend (currency units) budget of the window", ["metric", "period"], registry=r)
        self.budget_remaining = Gauge("rate_limit_budget_remaining", "Tokens or spend (currency units) left in the window", ["metric", "period"], registry=r)
        self.rl_check = Histogram(
            "rate_limit_check_duration_seconds", "Admission decision + persistence",
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5), registry=r,
        )
        # --- added ----------------------------------------------------------------
        self.token_fetches = Counter("oauth2_token_fetches_total", "Token requests, by outcome", ["outcome"], registry=r)
        self.batch_size = Histogram(
            "embedding_batch_size", "Inputs per backend request", ["backend"], buckets=BATCH_BUCKETS, registry=r
        )
        self.backend_requests = model_counter(
            "embedding_requests_total", "Backend requests by backend, model and outcome", ["backend", "model", "outcome"]
        )
        self.stage_tasks = Counter(
            "processor_stage_tasks_total", "Tasks through each stage of the data path", ["stage"], registry=r
        )
        self.channel_depth = Gauge("processor_channel_depth", "Items waiting between stages", ["channel"], registry=r)
        self.backlog = _StampedGauge(
            "ai_tasks_pending_backlog", "Pending entries read at the last poll (a lower bound when the read stopped early)", registry=r
        )
        self.last_poll_success = Gauge("ai_tasks_last_successful_poll_timestamp_seconds", "Wall time of the last successful poll", registry=r)
        self.pickup_age = Histogram("ai_task_pickup_age_seconds", "Task created to claimed", buckets=AGE_BUCKETS, registry=r)
        self.e2e_latency = Histogram("ai_task_end_to_end_seconds", "Task created to reported", buckets=AGE_BUCKETS, registry=r)
        self.retries = Counter("processor_retries_total", "Retries by dependency and reason", ["dependency", "reason"], registry=r)
        self.outbox_size = Gauge("processor_outbox_size", "Results computed and not yet reported", registry=r)
        # Set by the runtime as before; once `watch` is called it is computed at scrape time.
        self.outbox_oldest = Gauge("processor_outbox_oldest_age_seconds", "Age of the oldest unreported result", registry=r)
        self.rejected = Counter("ai_tasks_rejected_total", "Pending entries that could not be processed", ["reason"], registry=r)
        self.budget_refused = Counter(
            "ai_tasks_budget_refused_total", "Tasks a token or spend budget left pending for good as things are:"
            " no_price (no price for the model while a spend cap is on) or too_big (one task needs more than a"
            " tier's whole limit), by model (the first 10 names, then other)", ["reason", "model"], registry=r,
        )
        self.unservable = Counter(
            "ai_tasks_unservable_total", "Tasks left pending because this deployment cannot serve their model, by model"
            " (the first 10 names, then other)", ["model"], registry=r,
        )
        self.skipped = Counter("ai_tasks_skipped_total", "Pending tasks of a type this worker does not run (first sighting)", ["task_type"], registry=r)
        self.released = Counter("ai_tasks_released_total", "Claims given back (PATCH pending)", ["reason"], registry=r)
        self.fallbacks = model_counter(
            "embedding_fallbacks_total", "Tasks sent to a fallback model", ["model", "fallback"], ("model", "fallback")
        )
        self.quota_exhausted = Gauge("embedding_quota_exhausted", "1 while a backend reports its quota exhausted", ["backend"], registry=r)
        self.redis_round_trips = Counter("redis_round_trips_total", "Redis script calls, by script", ["script"], registry=r)
        self.ready = Gauge("processor_ready", "1 when /ready answers 200", registry=r)
        self.build = Info("processor_build", "Build information", registry=r)
        self.build.info({"version": processor.__version__, "python": platform.python_version()})
        # process_start_time_seconds and friends: the alert on "no poll since" counts from
        # the start of the process while nothing was polled yet.
        ProcessCollector(registry=r)
        r.register(_RuntimeCollector(self))
        self._preinit_static()
        if models is not None:
            self.set_models(models)

    # -- bounded model label -------------------------------------------------------------
    def set_models(self, models: Iterable[str]) -> None:
        """The model names that get their own label value (the settings' models)."""
        names = {m for m in models if m}
        names |= {m[: -len(":latest")] for m in names if m.endswith(":latest")}
        names |= {f"{m}:latest" for m in names if ":" not in m}
        self._models = frozenset(names)

    def model_label(self, name: str) -> str:
        """The label value for a model name: itself when the settings name it, else `other`.
        Before the models are known (a bare `Metrics()` in a test) names pass unchanged."""
        if self._models is None or name in self._models:
            return name
        return OTHER_MODEL

    # -- registration by the daemon --------------------------------------------------------
    def watch(self, w: Watched, *, models: Iterable[str]) -> None:
        """Register the running daemon: the models its settings name (and the fallbacks)
        bound the model label and pre-create the labelled series; its state feeds the gauges
        computed at scrape time."""
        s = w.config
        named = [*models, *s.fallback_models.keys(), *s.fallback_models.values()]
        self.set_models(named)
        self._runtime = w
        self.outbox_oldest.set_function(lambda: _outbox_oldest_age(w))
        models = sorted(set(named))
        for b in w.board.adapters:
            self.quota_exhausted.labels(b.value)
            self.batch_size.labels(b.value)
            for m in models:
                if w.routing.backend_for(m) is b:
                    for outcome in EMBED_OUTCOMES:
                        self.backend_requests.labels(b.value, m, outcome)
        for m, fb in s.fallback_models.items():
            self.fallbacks.labels(m, fb)
        for g in (w.api.guard, w.tokens.guard, *w.board.guards.values()):
            self.breaker_state.labels(g.name)

    def _preinit_static(self) -> None:
        from processor.pure.ratelimit import Period
        from processor.pure.tasks import RejectReason

        for status in TASK_STATUSES:
            self.tasks_processed.labels("text_embedding", status)
        for reason in RejectReason:
            self.rejected.labels(reason.value)
        for code in REPORT_REJECT_STATUSES:
            self.rejected.labels(f"report_{code}")
        for why in RELEASE_REASONS:
            self.released.labels(why)
        for outcome in ("success", "error"):
            self.token_fetches.labels(outcome)
        for p in Period:
            self.rl_exceeded.labels(p.value)
        for stage in STAGES:
            self.stage_tasks.labels(stage)
        for dep, why in (("api", "report"), ("api", "claim")):
            self.retries.labels(dep, why)


def _outbox_oldest_age(w: Watched) -> float:
    return w.book.oldest_result_age()


def pause_reasons(w: Watched) -> dict[str, bool]:
    """Why the poller would not poll now (the conditions `stages.intake.poller` waits on)."""
    try:
        now = trio.current_time()
    except RuntimeError:  # not inside the daemon's Trio run (a scrape from another thread)
        now = None
    out = dict.fromkeys(PAUSE_REASONS, False)
    out["shutting_down"] = w.stopping.is_set()
    out["intake_full"] = len(w.book) > w.book.capacity // 2  # what Book.wait_for_room waits on
    if now is not None:
        out["rate_limited"] = now < w.admission.paused_until
        out["api_breaker_open"] = w.api.guard.blocked_until() is not None
        guards = list(w.board.guards.values())
        out["backends_down"] = bool(guards) and all(g.blocked_until() is not None for g in guards)
    return out


class _RuntimeCollector(Collector):
    """Gauges computed at scrape time from the watched runtime."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> list[Any]:
        return []  # collected lazily: nothing to check for duplicates at registration

    def collect(self) -> Iterator[Any]:
        m = self._m
        paused = GaugeMetricFamily(
            "processor_intake_paused", "1 while the poller is idle on purpose, by reason", labels=["reason"]
        )
        age = GaugeMetricFamily(
            "ai_tasks_pending_backlog_age_seconds",
            "Seconds since ai_tasks_pending_backlog was measured (it is only measured by a poll)",
        )
        secrets = GaugeMetricFamily(
            "processor_redactor_secrets",
            "Secret values the log redactor holds (a count: the long-lived ones plus the current and previous access token)",
        )
        secrets.add_metric([], float(len(REDACTOR)))
        yield secrets
        w = m._runtime
        reasons = pause_reasons(w) if w is not None else dict.fromkeys(PAUSE_REASONS, False)
        for reason, on in reasons.items():
            paused.add_metric([reason], 1.0 if on else 0.0)
        yield paused
        if m.backlog.stamped_at is not None:
            age.add_metric([], max(0.0, time.time() - m.backlog.stamped_at))
            yield age
