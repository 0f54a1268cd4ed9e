"""Embedding backends behind one interface: embed these texts with this model, in order."""

from processor.effects.backends.base import EmbedError, EmbedErrorKind, EmbeddingBackend, RequestLimits

__all__ = ["EmbedError", "EmbedErrorKind", "EmbeddingBackend", "RequestLimits"]
