"""OpenAI embeddings through the official SDK (CONTRACT.md §3).

The SDK's own retries are off (`max_retries=0`): the project's retry policy decides. It is
handed the process's httpx client, so there is one HTTP stack and respx sees its calls.
Vectors travel base64-encoded (the SDK decodes them). `x-ratelimit-*` headers pace
requests before a 429 would.
"""

from __future__ import annotations

import base64
import binascii
import re
import sys
from array import array
from collections.abc import Mapping, Sequence

import httpx
import openai
import trio

from processor.effects.backends.base import EmbedError, EmbedErrorKind, EmbedResult, RequestLimits
from processor.effects.logs import REDACTOR, get_logger
from processor.effects.metrics import Metrics

MAX_INPUTS = 2048
MAX_REQUEST_TOKENS = 300_000
MAX_INPUT_TOKENS = 8192
_DIMENSIONS_MODELS = re.compile(r"^text-embedding-(?![a-z]*-?ada)(\d+)")
_RESET = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$")


def accepts_dimensions(model: str) -> bool:
    """`dimensions` is accepted by text-embedding-3-* and later models only."""
    m = _DIMENSIONS_MODELS.match(model)
    return m is not None and int(m.group(1)) >= 3


def parse_reset(value: str | None) -> float | None:
    """`x-ratelimit-reset-*` values look like `1s`, `6m0s`, `120ms`, `1h2m3.5s`."""
    if not value:
        return None
    m = _RESET.match(value.strip())
    if not m or not any(m.groups()):
        try:
            return float(value)
        except ValueError:
            return None
    h, mi, s, ms = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


def decode_vector(value: object) -> object:
    """base64 of little-endian float32 -> list of floats (other shapes pass through to the
    vector check, which rejects them with a reason)."""
    if isinstance(value, str):
        try:
            packed = array("f")
            packed.frombytes(base64.b64decode(value, validate=True))
        except (ValueError, binascii.Error):
            return value
        if sys.byteorder != "little":
            packed.byteswap()
        return packed.tolist()
    return value


class OpenAIBackend:
    name = "openai"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        dimensions: int,
        timeout: float,
        max_batch: int,
        metrics: Metrics,
    ) -> None:
        REDACTOR.add(api_key)
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=(base_url.rstrip("/") + "/v1") if base_url and not base_url.rstrip("/").endswith("/v1") else base_url,
            max_retries=0,
            timeout=timeout,
            # Our own httpx client (not httpx2): one HTTP library in the process, proxies and
            # CA variables honoured, and respx can stand in for OpenAI in tests.
            http_client=httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=32)),  # type: ignore[arg-type]
        )
        self._dimensions = dimensions
        self._timeout = timeout
        self._max_batch = min(max_batch, MAX_INPUTS)
        self._metrics = metrics
        self._dims: dict[str, int] = {}
        self._pace_until = 0.0
        self._log = get_logger("openai")

    def limits(self, model: str) -> RequestLimits:
        return RequestLimits(self._max_batch, MAX_REQUEST_TOKENS, MAX_INPUT_TOKENS)

    def expected_dim(self, model: str) -> int | None:
        return self._dimensions if accepts_dimensions(model) else self._dims.get(model)

    def learn_dim(self, model: str, dim: int) -> None:
        self._dims.setdefault(model, dim)

    async def embed(self, model: str, texts: Sequence[str]) -> EmbedResult:
        if trio.current_time() < self._pace_until:
            await trio.sleep_until(self._pace_until)
        timeout = self._timeout + 0.05 * len(texts)
        try:
            raw = await self._client.embeddings.with_raw_response.create(
                model=model, input=list(texts), encoding_format="base64", timeout=timeout,
                dimensions=self._dimensions if accepts_dimensions(model) else openai.omit,
            )
        except openai.APITimeoutError:
            self._count(model, "timeout")
            raise EmbedError("OpenAI request timed out", EmbedErrorKind.TIMEOUT) from None
        except openai.APIConnectionError as exc:
            self._count(model, "connection_error")
            raise EmbedError(f"OpenAI unreachable: {type(exc.__cause__ or exc).__name__}", EmbedErrorKind.TRANSIENT, unreachable=True) from None
        except openai.APIStatusError as exc:
            self._count(model, str(exc.status_code))
            raise self._classify(exc) from None
        self._count(model, "success")
        self._pace(raw.headers)
        resp = raw.parse()
        data = sorted(resp.data, key=lambda d: d.index)
        vectors = [decode_vector(d.embedding) for d in data]
        usage = getattr(resp, "usage", None)
        tokens = getattr(usage, "prompt_tokens", None) if usage else None
        if tokens:
            self._metrics.openai_tokens.labels(model, "prompt").inc(tokens)
        return EmbedResult(vectors, tokens)

    def _count(self, model: str, status: str) -> None:
        self._metrics.openai_requests.labels(model, status).inc()

    def _pace(self, headers: Mapping[str, str]) -> None:
        """Slow down before a 429: when a budget is nearly spent, wait for its reset."""
        for kind in ("requests", "tokens"):
            remaining, limit = headers.get(f"x-ratelimit-remaining-{kind}"), headers.get(f"x-ratelimit-limit-{kind}")
            try:
                rem, lim = int(remaining), int(limit)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            if lim > 0 and rem <= max(1, lim // 50):
                reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
                if reset:
                    self._pace_until = max(self._pace_until, trio.current_time() + reset)
                    self._log.info("openai_pacing", budget=kind, remaining=rem, wait_seconds=reset)

    def _classify(self, exc: openai.APIStatusError) -> EmbedError:
        status = exc.status_code
        body = exc.body if isinstance(exc.body, dict) else {}
        err = body.get("error", body) if isinstance(body, dict) else {}
        code = err.get("code") if isinstance(err, dict) else None
        message = (err.get("message") if isinstance(err, dict) else None) or str(exc)
        message = f"OpenAI {status}: {message}"[:500]
        if status == 429:
            if code == "insufficient_quota":
                return EmbedError(message, EmbedErrorKind.BACKEND_DOWN, status=status, quota=True)
            ra = exc.response.headers.get("retry-after")
            try:
                retry_after = float(ra) if ra is not None else None
            except ValueError:
                retry_after = None
            if retry_after is not None:
                self._pace_until = max(self._pace_until, trio.current_time() + retry_after)
            return EmbedError(message, EmbedErrorKind.RATE_LIMITED, status=status, retry_after=retry_after)
        if status in (401, 403):
            return EmbedError(message, EmbedErrorKind.BACKEND_DOWN, status=status)
        if status == 404:
            return EmbedError(message, EmbedErrorKind.MODEL, status=status)
        if status == 408 or status >= 500:
            return EmbedError(message, EmbedErrorKind.TRANSIENT, status=status)
        return EmbedError(message, EmbedErrorKind.INPUT, status=status)

    async def start(self) -> None:
        return None

    async def probe(self, model: str) -> None:
        """A one-input request: raises EmbedError if the backend cannot serve `model`."""
        await self.embed(model, ["probe"])

    async def aclose(self) -> None:
        await self._client.close()
