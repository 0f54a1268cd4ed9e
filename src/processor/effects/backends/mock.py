"""Deterministic fake embeddings for development and tests.

The same (model, text) always gives the same unit-length vector of EMBEDDING_DIMENSIONS;
different texts give different vectors. No randomness: the vector is derived from a hash.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Sequence

import trio

from processor.effects.backends.base import EmbedResult, RequestLimits, estimate_tokens


def mock_vector(model: str, text: str, dim: int) -> list[float]:
    raw = hashlib.shake_256(f"{model}\x00{text}".encode()).digest(4 * dim)
    ints = array("i")
    ints.frombytes(raw)
    norm = math.hypot(*ints) or 1.0
    return [x / norm for x in ints]


class MockBackend:
    name = "mock"

    def __init__(self, dim: int, *, max_items: int = 2048, latency: float = 0.0) -> None:
        self.dim = dim
        self.latency = latency  # seconds per request: simulates a real backend in demos and tests
        self._max_items = max_items
        self.inputs_seen = 0
        self.requests = 0

    def limits(self, model: str) -> RequestLimits:
        return RequestLimits(self._max_items)

    def expected_dim(self, model: str) -> int | None:
        return self.dim

    def learn_dim(self, model: str, dim: int) -> None:
        return None

    async def embed(self, model: str, texts: Sequence[str], *, timeout: float | None = None) -> EmbedResult:
        if self.latency:
            await trio.sleep(self.latency)
        self.requests += 1
        self.inputs_seen += len(texts)
        return EmbedResult([mock_vector(model, t, self.dim) for t in texts], sum(estimate_tokens(t) for t in texts))

    async def start(self) -> None:
        return None

    async def probe(self, model: str) -> None:
        return None

    async def aclose(self) -> None:
        return None
