"""Prometheus metrics. Names of the original service are kept so dashboards keep working.

Every label is bounded: endpoints are route templates (`/api/ai-tasks/:id`), never ids;
reasons are enum values; models come from configuration or the tasks (bounded by the
modes' model lists in practice).
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

import processor

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
AGE_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 300, 900, 3600, 4 * 3600, 86400)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
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
        self.openai_requests = Counter("openai_requests_total", "OpenAI requests", ["model", "status"], registry=r)
        self.openai_tokens = Counter("openai_tokens_used_total", "OpenAI tokens", ["model", "type"], registry=r)
        self.ollama_requests = Counter("ollama_requests_total", "Ollama requests", ["model", "status"], registry=r)
        self.ollama_tokens = Counter("ollama_tokens_used_total", "Ollama tokens (estimated)", ["model", "type"], registry=r)
        self.breaker_state = Gauge(
            "circuit_breaker_state", "0 closed, 1 open, 2 half-open", ["service"], registry=r
        )
        self.rl_usage = Gauge("rate_limit_current_usage", "Units used in the window", ["period"], registry=r)
        self.rl_max = Gauge("rate_limit_max_allowed", "Limit of the window", ["period"], registry=r)
        self.rl_remaining = Gauge("rate_limit_remaining", "Units left in the window", ["period"], registry=r)
        self.rl_exceeded = Counter(
            "rate_limit_exceeded_total", "Admissions refused (in part) by a tier", ["period"], registry=r
        )
        self.rl_check = Histogram(
            "rate_limit_check_duration_seconds", "Admission decision + persistence",
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5), registry=r,
        )
        # --- added ----------------------------------------------------------------
        self.token_fetches = Counter("oauth2_token_fetches_total", "Token requests, by outcome", ["outcome"], registry=r)
        self.batch_size = Histogram(
            "embedding_batch_size", "Inputs per backend request", ["backend"], buckets=BATCH_BUCKETS, registry=r
        )
        self.backend_requests = Counter(
            "embedding_requests_total", "Backend requests by backend, model and outcome",
            ["backend", "model", "outcome"], registry=r,
        )
        self.stage_tasks = Counter(
            "processor_stage_tasks_total", "Tasks through each stage of the data path", ["stage"], registry=r
        )
        self.channel_depth = Gauge("processor_channel_depth", "Items waiting between stages", ["channel"], registry=r)
        self.backlog = Gauge("ai_tasks_pending_backlog", "Pending entries read at the last poll (a lower bound when the read stopped early)", registry=r)
        self.last_poll_success = Gauge("ai_tasks_last_successful_poll_timestamp_seconds", "Wall time of the last successful poll", registry=r)
        self.pickup_age = Histogram("ai_task_pickup_age_seconds", "Task created to claimed", buckets=AGE_BUCKETS, registry=r)
        self.e2e_latency = Histogram("ai_task_end_to_end_seconds", "Task created to reported", buckets=AGE_BUCKETS, registry=r)
        self.retries = Counter("processor_retries_total", "Retries by dependency and reason", ["dependency", "reason"], registry=r)
        self.outbox_size = Gauge("processor_outbox_size", "Results computed and not yet reported", registry=r)
        self.outbox_oldest = Gauge("processor_outbox_oldest_age_seconds", "Age of the oldest unreported result", registry=r)
        self.rejected = Counter("ai_tasks_rejected_total", "Pending entries that could not be processed", ["reason"], registry=r)
        self.skipped = Counter("ai_tasks_skipped_total", "Pending tasks of a type this worker does not run (first sighting)", ["task_type"], registry=r)
        self.released = Counter("ai_tasks_released_total", "Claims given back (PATCH pending)", ["reason"], registry=r)
        self.fallbacks = Counter("embedding_fallbacks_total", "Tasks sent to a fallback model", ["model", "fallback"], registry=r)
        self.quota_exhausted = Gauge("embedding_quota_exhausted", "1 while a backend reports its quota exhausted", ["backend"], registry=r)
        self.redis_round_trips = Counter("redis_round_trips_total", "Redis script calls, by script", ["script"], registry=r)
        self.ready = Gauge("processor_ready", "1 when /ready answers 200", registry=r)
        self.build = Info("processor_build", "Build information", registry=r)
        self.build.info({"version": processor.__version__, "python": platform.python_version()})
