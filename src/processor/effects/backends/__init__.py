"""Embedding backends behind one interface: embed these texts with this model, in order."""

from processor.effects.backends.base import EmbeddingBackend, EmbedError, RequestLimits

__all__ = ["EmbedError", "EmbeddingBackend", "RequestLimits"]
