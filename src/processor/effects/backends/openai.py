"""OpenAI embeddings through the official SDK (CONTRACT.md §3).

The SDK's own retries are off (`max_retries=0`): the project's retry policy decides. It is
handed the process's httpx client, so there is one HTTP stack and respx sees its calls.
Vectors travel base64-encoded (decoded and checked here: a malformed answer is an
EmbedError MALFORMED, vectors of another size than EMBEDDING_DIMENSIONS one of DIMENSION). `x-ratelimit-*` headers pace
requests before a 429 would.
"""

from __future__ import annotations

import base64
import binascii
import re
import sys
from array import array
from collections.abc import Sequence

import httpx
import openai
import orjson

from processor.effects.backends.base import (
    EmbedError,
    EmbedResult,
    RequestLimits,
    checked_vectors,
    classify_status,
    parameter_hint,
    retry_after,
    short,
)
from processor.effects.logs import REDACTOR, get_logger
from processor.effects.metrics import Metrics
from processor.effects.openai_pacing import ModelPacer, TokenPacer
from processor.pure.faults import Fault

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
    """base64 of little-endian float32 -> list of floats. A string that is not such base64
    raises ValueError; other shapes pass through to the answer check, which rejects them."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error):
            raise ValueError("a vector is a string that is not base64") from None
        if len(raw) % 4:
            raise ValueError(f"a base64 vector of {len(raw)} bytes is not a whole number of float32")
        packed = array("f")
        packed.frombytes(raw)
        if sys.byteorder != "little":
            packed.byteswap()
        return packed.tolist()
    return value


def vectors_of(content: bytes, n_inputs: int) -> tuple[list[object], int | None]:
    """The vectors (in input order) and prompt tokens of a 200 answer; ValueError when its
    body is not what CONTRACT.md §3 says."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise ValueError(f"the body is not JSON ({short(content[:60].decode('utf-8', 'replace'), 60)!r})") from None
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise ValueError("the body has no `data` list")
    data = body["data"]
    if len(data) != n_inputs:
        raise ValueError(f"the answer holds {len(data)} vectors for {n_inputs} inputs")
    slots: list[object] = [None] * n_inputs
    seen = [False] * n_inputs
    for item in data:
        idx = item.get("index") if isinstance(item, dict) else None
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < n_inputs or seen[idx]:
            raise ValueError(f"an entry of `data` has no usable `index` ({short(repr(idx), 40)})")
        seen[idx] = True
        slots[idx] = decode_vector(item.get("embedding"))
    usage = body.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return slots, tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0 else None


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
        pacer: TokenPacer | None = None,
    ) -> None:
        REDACTOR.add(api_key)
        self._api_key = api_key
        self._encoding = "base64"  # "float" once a compatible server refuses base64
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
        self.pacer = pacer or TokenPacer()  # x-ratelimit-* pacing, per model (effects/openai_pacing.py)
        self._log = get_logger("openai")

    def limits(self, model: str) -> RequestLimits:
        return RequestLimits(self._max_batch, MAX_REQUEST_TOKENS, MAX_INPUT_TOKENS)

    def expected_dim(self, model: str) -> int | None:
        return self._dimensions if accepts_dimensions(model) else self._dims.get(model)

    def learn_dim(self, model: str, dim: int) -> None:
        self._dims.setdefault(model, dim)

    async def embed(self, model: str, texts: Sequence[str], *, timeout: float | None = None) -> EmbedResult:
        try:
            return await self._embed(model, texts, timeout)
        except EmbedError as exc:
            if exc.fault is Fault.PARAMETER and exc.param == "encoding_format" and self._encoding == "base64":
                # a compatible server without base64 vectors: ask for JSON floats from now on
                self._encoding = "float"
                self._log.warning("openai_base64_refused", error=str(exc), action="asking for float vectors")
                return await self._embed(model, texts, timeout)
            raise

    async def _embed(self, model: str, texts: Sequence[str], timeout: float | None = None) -> EmbedResult:
        if timeout is None:
            timeout = self._timeout + 0.05 * len(texts)
        pace = self.pacer.model(model)
        chars = sum(map(len, texts))
        await pace.wait_turn(pace.estimate(chars, items=len(texts)))
        try:
            return await self._send(pace, model, texts, timeout, chars)
        finally:
            pace.forget()  # no answer came: the reservation goes

    async def _send(self, pace: ModelPacer, model: str, texts: Sequence[str], timeout: float, chars: int) -> EmbedResult:
        try:
            raw = await self._client.embeddings.with_raw_response.create(
                model=model, input=list(texts), encoding_format=self._encoding, timeout=timeout,  # type: ignore[arg-type]
                dimensions=self._dimensions if accepts_dimensions(model) else openai.omit,
            )
            content = raw.content
        except openai.APITimeoutError:
            self._count(model, "timeout")
            raise EmbedError(f"OpenAI request timed out after {timeout:g}s", Fault.TIMEOUT) from None
        except openai.APIConnectionError as exc:
            self._count(model, "connection_error")
            raise EmbedError(f"OpenAI unreachable: {type(exc.__cause__ or exc).__name__}", Fault.UNREACHABLE) from None
        except openai.APIStatusError as exc:
            self._count(model, str(exc.status_code))
            error = self._classify(exc)
            refused = exc.status_code == 429 or error.fault is Fault.RATE_LIMITED  # not charged
            pace.after(exc.response.headers, 0 if refused else None, chars=chars,
                       retry_after=error.retry_after if error.fault is Fault.RATE_LIMITED else None)
            raise error from None
        except Exception as exc:  # anything else on the way: no answer to speak of
            self._count(model, "connection_error")
            raise EmbedError(f"OpenAI request failed: {type(exc).__name__}", Fault.UNREACHABLE) from None
        try:
            slots, tokens = vectors_of(content, len(texts))
        except ValueError as exc:
            pace.after(raw.headers, chars=chars)
            self._count(model, "malformed")
            raise EmbedError(f"OpenAI returned a malformed answer: {exc}", Fault.MALFORMED) from None
        pace.after(raw.headers, tokens, chars=chars)
        try:
            vectors, dim = checked_vectors(slots, len(texts), self.expected_dim(model), who=f"OpenAI {model}",
                                           dimension_hint=lambda got: self._dimension_hint(model, got))
        except EmbedError as exc:
            self._count(model, "malformed" if exc.fault is Fault.MALFORMED else "dimension")
            raise
        self._count(model, "success")
        self.learn_dim(model, dim)
        if tokens:
            self._metrics.openai_tokens.labels(model, "prompt").inc(tokens)
        return EmbedResult(vectors, tokens)

    def _dimension_hint(self, model: str, got: int) -> str:
        if accepts_dimensions(model):
            return (f"the server ignores `dimensions`={self._dimensions}: set EMBEDDING_DIMENSIONS={got}, "
                    "or use a server and model that honour it")
        return f"{model} changed its vector size (was {self._dims.get(model)}): check OPENAI_BASE_URL and the model"

    def _count(self, model: str, status: str) -> None:
        self._metrics.openai_requests.labels(model, status).inc()

    def _classify(self, exc: openai.APIStatusError) -> EmbedError:
        status = exc.status_code
        body = exc.body if isinstance(exc.body, dict) else {}
        err = body.get("error", body)
        err = err if isinstance(err, dict) else {"message": err}
        text = err.get("message") or err.get("detail") or (short(exc.response.text) if exc.response is not None else "") or str(exc)
        text = self._scrub(short(str(text), 400))
        got = classify_status(status, text, code=err.get("code"), type_=err.get("type"), param=err.get("param"))
        message = f"OpenAI {status}: {text}"
        if got.fault is Fault.PARAMETER:
            message += f" ({parameter_hint(got.param, 'OPENAI_BASE_URL')})"
        elif got.fault is Fault.AUTH:
            message += " (check OPENAI_API_KEY)"
        elif got.fault is Fault.QUOTA:
            message += " (the account is out of credit)"
        wait = retry_after(exc.response.headers) if got.fault in (Fault.RATE_LIMITED, Fault.BUSY) else None
        return EmbedError(message, got.fault, status=status, retry_after=wait, param=got.param)

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    async def start(self) -> None:
        return None

    async def probe(self, model: str) -> None:
        """A one-input request: raises EmbedError if the backend cannot serve `model`."""
        await self.embed(model, ["probe"])

    async def aclose(self) -> None:
        await self._client.close()
