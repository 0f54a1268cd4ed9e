"""A real embedding model on this machine, no server and no download: WordLlama
(`pip install 'processor[local]'`), whose 16 MB of weights ship in its wheel.

Vectors have 256 dimensions (64 or 128 by truncation: EMBEDDING_DIMENSIONS) and unit
length. Every model name is served by the one model: in `local` mode a task's
`content.model` does not choose anything. Encoding is CPU work: it runs in a worker thread
(`trio.to_thread.run_sync`), one batch at a time, so the event loop keeps answering.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from processor.effects.backends.base import EmbedError, EmbedResult, RequestLimits, estimate_tokens
from processor.pure.faults import Fault

MODEL_NAME = "wordllama-l2-supercat"
FULL_DIM = 256
DIMENSIONS = (64, 128, 256)


class LocalUnavailable(Exception):
    """wordllama is not installed, its bundled weights cannot be loaded, or it cannot give
    the configured size; `fault` classifies it for the caller."""

    def __init__(self, message: str, fault: Fault = Fault.MODEL_MISSING) -> None:
        super().__init__(message)
        self.fault = fault


def load_wordllama(dim: int = FULL_DIM) -> Any:
    """Load the model from the files in the wordllama package itself (never the network)."""
    # wordllama calls logging.basicConfig() when imported, which would send every library's
    # INFO records (httpx's among them) to stderr past our log pipeline: undo that.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        import wordllama
        from wordllama import WordLlama
    except ImportError:
        raise LocalUnavailable("PROCESSING_MODE=local needs wordllama: pip install 'processor[local]'") from None
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    if dim not in DIMENSIONS:
        raise LocalUnavailable(f"the local model gives {', '.join(map(str, DIMENSIONS))} dimensions, not {dim} (EMBEDDING_DIMENSIONS)",
                               Fault.DIMENSION)
    try:
        return WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True,
                              trunc_dim=None if dim == FULL_DIM else dim)
    except Exception as exc:  # missing files in a broken install: say which
        raise LocalUnavailable(f"cannot load wordllama's bundled weights: {exc}") from None


def local_available() -> bool:
    """Whether the `local` extra is installed (without importing it)."""
    return importlib.util.find_spec("wordllama") is not None


class LocalBackend:
    name = "local"

    def __init__(self, dim: int = FULL_DIM, *, max_items: int = 256) -> None:
        self.dim = dim
        self._max_items = max_items
        self._model: Any = None
        self._cpu = trio.CapacityLimiter(1)  # one encoding at a time: it is CPU-bound
        self.requests = 0

    def limits(self, model: str) -> RequestLimits:
        return RequestLimits(self._max_items)

    def expected_dim(self, model: str) -> int | None:
        return self.dim

    def learn_dim(self, model: str, dim: int) -> None:
        return None

    async def start(self) -> None:
        if self._model is None:
            self._model = await trio.to_thread.run_sync(load_wordllama, self.dim)

    async def embed(self, model: str, texts: Sequence[str], *, timeout: float | None = None) -> EmbedResult:
        try:
            await self.start()
        except LocalUnavailable as exc:
            raise EmbedError(str(exc), exc.fault, param="dimensions" if exc.fault is Fault.DIMENSION else None) from None
        batch = list(texts)
        # A thread cannot be interrupted: on timeout it is abandoned (it finishes on its own,
        # holding the CPU limiter until then) and the batch counts as timed out.
        with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
            vectors = await trio.to_thread.run_sync(self._encode, batch, limiter=self._cpu, abandon_on_cancel=True)
        if scope.cancelled_caught:
            raise EmbedError(f"local model: no answer within {timeout:g}s for {len(batch)} inputs", Fault.TIMEOUT)
        self.requests += 1
        return EmbedResult(vectors, sum(estimate_tokens(t) for t in batch))

    def _encode(self, texts: list[str]) -> list[list[float]]:
        return [[float(x) for x in row] for row in self._model.embed(texts, norm=True)]

    async def probe(self, model: str) -> None:
        await self.embed(model, ["probe"])

    async def aclose(self) -> None:
        return None


# Claims for `python -m processor demo` with the local model: a few topics, each worded in
# several ways, so the nearest neighbours show what the vectors capture.
DEMO_CLAIMS = (
    "Vaccines cause autism in children.",
    "The MMR jab makes kids autistic.",
    "Childhood immunisation is linked to autism.",
    "The flu shot gives you the flu.",
    "The moon landing in 1969 was staged in a film studio.",
    "NASA faked the Apollo missions to the moon.",
    "Astronauts never walked on the lunar surface.",
    "Global temperatures have not risen since 1998.",
    "The climate is not warming; the data is manipulated.",
    "Carbon dioxide emissions do not affect the earth's temperature.",
    "Sea levels are rising because polar ice is melting.",
    "Drinking eight glasses of water a day is necessary for health.",
    "You must drink two litres of water daily to stay healthy.",
    "Coffee dehydrates your body.",
    "The Great Wall of China is visible from space with the naked eye.",
    "You can see the Chinese wall from orbit without a telescope.",
    "Humans only use ten percent of their brains.",
    "Most of the human brain is never used.",
    "The election was stolen through millions of fraudulent postal votes.",
    "Mail-in ballots were used to rig the vote count.",
    "Eating carrots improves your night vision.",
    "Lightning never strikes the same place twice.",
    "5G mobile networks spread the coronavirus.",
    "Cell phone towers transmit COVID-19.",
)
DEMO_QUERIES = (0, 4, 7, 14, 22)  # claims whose neighbours the demo prints


def nearest_neighbours(query: Sequence[float], candidates: Sequence[tuple[str, Sequence[float]]], k: int = 2) -> list[tuple[float, str]]:
    """The k candidates most similar to `query` by cosine similarity, best first."""

    def cosine(a: Sequence[float], b: Sequence[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        na = sum(x * x for x in a) ** 0.5
        nb = sum(y * y for y in b) ** 0.5
        return dot / (na * nb) if na and nb else 0.0

    scored = sorted(((cosine(query, vec), text) for text, vec in candidates), reverse=True)
    return scored[:k]
