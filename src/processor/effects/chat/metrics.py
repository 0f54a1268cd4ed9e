"""Metrics of the chat backends and the triage kinds, on the process's registry.

Kept out of `effects/metrics.py` (another owner) but registered on the same
`CollectorRegistry`: `chat_metrics(metrics)` returns one `ChatMetrics` per registry.
Labels are bounded: backend and task type are enums, models come from tasks and MODEL_MAP.
"""

from __future__ import annotations

import weakref
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from processor.effects.metrics import LATENCY_BUCKETS, Metrics

MODEL_LABELS_MAX = 10  # distinct model names with their own series; the rest are "other"


class _BoundedModels:
    """A labelled metric whose model label values (task-chosen names) are bounded."""

    def __init__(self, metric: Any, positions: tuple[int, ...], bound: Any) -> None:
        self._metric = metric
        self._positions = positions
        self._bound = bound

    def labels(self, *values: str) -> Any:
        out = list(values)
        for p in self._positions:
            out[p] = self._bound(out[p])
        return self._metric.labels(*out)


class ChatMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self._models: set[str] = set()
        self.requests = _BoundedModels(Counter(
            "chat_requests_total", "Chat model requests by backend, model, task type and outcome",
            ["backend", "model", "task_type", "outcome"], registry=r,
        ), (1,), self.model_label)
        self.tokens = _BoundedModels(Counter(
            "chat_tokens_used_total", "Chat model tokens by backend, model, task type and kind (prompt/completion)",
            ["backend", "model", "task_type", "kind"], registry=r,
        ), (1,), self.model_label)
        self.duration = Histogram(
            "chat_request_duration_seconds", "Chat request latency", ["backend"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.bad_answers = Counter(
            "chat_bad_answers_total", "Model answers that were unusable, by task type and reason",
            ["task_type", "reason"], registry=r,
        )
        self.model_mapped = _BoundedModels(Counter(
            "chat_model_mapped_total", "Tasks whose model was mapped by MODEL_MAP", ["model", "mapped_to"], registry=r,
        ), (0, 1), self.model_label)
        self.ollama_pulls = Counter("chat_ollama_pulls_total", "Chat models pulled on first use, by outcome", ["outcome"], registry=r)
        self.wikidata_requests = Counter(
            "wikidata_requests_total", "Wikidata API requests by action and outcome", ["action", "outcome"], registry=r,
        )
        self.wikidata_cache = Counter(
            "wikidata_cache_lookups_total", "Wikidata cache lookups by kind and result (hit/miss)", ["kind", "result"], registry=r,
        )
        self.wikidata_degraded = Counter(
            "wikidata_enrichment_degraded_total",
            "Results sent without (some) Wikidata ids, by reason (down, slow, breaker_open, disabled)",
            ["reason"], registry=r,
        )


    def model_label(self, name: str) -> str:
        """A task names its model: the first MODEL_LABELS_MAX distinct names get their own
        series (cut to 100 characters), every later one is `other`."""
        name = str(name)[:100]
        if name in self._models:
            return name
        if len(self._models) < MODEL_LABELS_MAX:
            self._models.add(name)
            return name
        return "other"


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, ChatMetrics] = weakref.WeakKeyDictionary()


def chat_metrics(metrics: Metrics | CollectorRegistry | None) -> ChatMetrics:
    """The chat metrics registered on `metrics`' registry (a private one for None)."""
    registry = metrics.registry if isinstance(metrics, Metrics) else metrics or CollectorRegistry()
    found = _BY_REGISTRY.get(registry)
    if found is None:
        found = _BY_REGISTRY[registry] = ChatMetrics(registry)
    return found
