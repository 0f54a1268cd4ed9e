"""The chat adapters a processing mode needs, for the composition root."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from processor.effects.chat.base import ChatBackend
from processor.effects.chat.metrics import chat_metrics
from processor.pure.faults import Dependency
from processor.pure.tasks import Backend


def build_chat_backends(settings: Any, metrics: Any) -> dict[Backend, ChatBackend]:
    """mock: the mock; ollama: Ollama; openai: OpenAI; hybrid: both (routed by model name)."""
    from processor.config import Mode

    cm = chat_metrics(metrics)
    mode = settings.processing_mode
    out: dict[Backend, ChatBackend] = {}
    if mode is Mode.MOCK:
        from processor.effects.chat.mock import MockChat

        out[Backend.MOCK] = MockChat(metrics=cm, latency=settings.mock_latency_ms / 1000)
    if mode in (Mode.OLLAMA, Mode.HYBRID):
        from processor.effects.chat.ollama import OllamaChat

        out[Backend.OLLAMA] = OllamaChat(
            base_url=settings.ollama_base_url, timeout=settings.ollama_timeout,
            download_timeout=settings.ollama_model_download_timeout, keep_alive=settings.ollama_keep_alive,
            num_ctx=settings.chat_num_ctx, max_tokens=settings.chat_max_tokens, metrics=cm,
        )
    if mode in (Mode.OPENAI, Mode.HYBRID):
        from processor.effects.chat.openai import OpenAIChat

        assert settings.openai_api_key
        out[Backend.OPENAI] = OpenAIChat(
            api_key=settings.openai_api_key, base_url=settings.openai_base_url, timeout=settings.openai_timeout,
            max_tokens=settings.chat_max_tokens, metrics=cm,
        )
    return out


def build_chat_ports(settings: Any, metrics: Any, kinds: Mapping[str, Any], *, redis_client: Any = None) -> tuple[dict[Backend, ChatBackend], Any]:
    """The chat adapters and the Wikidata enricher, when a kind this worker runs needs them
    (else none: an embeddings-only worker opens no chat client)."""
    if not any(getattr(k, "dependency", None) is Dependency.CHAT for k in kinds.values()):
        return {}, None
    from processor.effects.wikidata import build_wikidata

    return build_chat_backends(settings, metrics), build_wikidata(settings, chat_metrics(metrics), redis_client=redis_client)
