"""Ollama embeddings over its HTTP API (CONTRACT.md §4), a thin httpx adapter.

`/api/embed` takes a list of inputs (batching is what speeds Ollama up; concurrency does
not: it runs one request per model at a time, so requests per model are serialised here).
At start, each of SUPPORTED_MODELS is checked with `/api/tags`, pulled if missing (progress
logged, bounded by OLLAMA_MODEL_DOWNLOAD_TIMEOUT) and confirmed with `/api/show` as an
embedding model whose vector size is learnt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import orjson
import trio

from processor.effects.backends.base import EmbedError, EmbedErrorKind, EmbedResult, RequestLimits, estimate_tokens
from processor.effects.logs import get_logger
from processor.effects.metrics import Metrics

PER_INPUT_TIMEOUT = 1.0  # seconds added to OLLAMA_TIMEOUT per input of a batch
STARTUP_WAIT = 60.0  # how long the start waits for an Ollama that is not answering yet


class ModelUnavailable(Exception):
    """A configured model cannot be made available (pull failed, not an embedding model)."""


def _base_name(model: str) -> str:
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


class OllamaBackend:
    name = "ollama"

    def __init__(
        self,
        *,
        base_url: str,
        models: Sequence[str],
        timeout: float,
        download_timeout: float,
        keep_alive: str,
        truncate: bool,
        max_batch: int,
        metrics: Metrics,
        strict: bool = True,
    ) -> None:
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=httpx.Timeout(timeout, connect=10))
        self._models = list(models)
        self._timeout = timeout
        self._download_timeout = download_timeout
        self._keep_alive = keep_alive
        self._truncate = truncate
        self._max_batch = max_batch
        self._metrics = metrics
        self._dims: dict[str, int] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._pulled_after_404: set[str] = set()
        self.unavailable: dict[str, str] = {}  # model -> reason
        self._strict = strict  # ollama mode: a model that cannot be made available stops the start
        self._log = get_logger("ollama")

    def limits(self, model: str) -> RequestLimits:
        return RequestLimits(self._max_batch)

    def expected_dim(self, model: str) -> int | None:
        return self._dims.get(model)

    def learn_dim(self, model: str, dim: int) -> None:
        self._dims.setdefault(model, dim)

    def timeout_for(self, n: int) -> float:
        return self._timeout + PER_INPUT_TIMEOUT * n

    async def embed(self, model: str, texts: Sequence[str]) -> EmbedResult:
        if model in self.unavailable:
            raise EmbedError(f"model {model!r} is unavailable on Ollama: {self.unavailable[model]}", EmbedErrorKind.MODEL)
        body = {"model": model, "input": list(texts), "truncate": self._truncate, "keep_alive": self._keep_alive}
        lock = self._locks.setdefault(model, trio.Lock())
        async with lock:
            try:
                resp = await self._http.post("/api/embed", content=orjson.dumps(body), timeout=self.timeout_for(len(texts)),
                                             headers={"Content-Type": "application/json"})
            except httpx.TimeoutException:
                self._count(model, "timeout")
                raise EmbedError(f"Ollama timed out on a batch of {len(texts)}", EmbedErrorKind.TIMEOUT) from None
            except httpx.HTTPError as exc:
                self._count(model, "connection_error")
                raise EmbedError(f"Ollama unreachable: {type(exc).__name__}", EmbedErrorKind.TRANSIENT, unreachable=True) from None
        self._count(model, str(resp.status_code) if resp.status_code != 200 else "success")
        if resp.status_code == 200:
            try:
                data = orjson.loads(resp.content)
                vectors = data["embeddings"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                raise EmbedError("Ollama returned an unreadable answer", EmbedErrorKind.TRANSIENT) from None
            tokens = data.get("prompt_eval_count")
            if not isinstance(tokens, int):
                tokens = sum(estimate_tokens(t) for t in texts)
            self._metrics.ollama_tokens.labels(model, "prompt").inc(tokens)
            return EmbedResult(vectors, tokens)
        message = f"Ollama {resp.status_code}: {_error_text(resp)}"[:500]
        if resp.status_code == 404:
            if model not in self._pulled_after_404:
                self._pulled_after_404.add(model)
                try:
                    await self.ensure_model(model)
                except ModelUnavailable as exc:
                    self.unavailable[model] = str(exc)
                    raise EmbedError(f"model {model!r} not found on Ollama and could not be pulled: {exc}", EmbedErrorKind.MODEL, status=404) from None
                raise EmbedError(message + " (pulled it; retrying)", EmbedErrorKind.TRANSIENT, status=404)
            raise EmbedError(f"model {model!r} not found on Ollama: {message}", EmbedErrorKind.MODEL, status=404)
        if resp.status_code == 400:
            raise EmbedError(message, EmbedErrorKind.INPUT, status=400)
        if resp.status_code in (408, 429) or resp.status_code >= 500:
            return_kind = EmbedErrorKind.TRANSIENT
            raise EmbedError(message, return_kind, status=resp.status_code)
        raise EmbedError(message, EmbedErrorKind.INPUT, status=resp.status_code)

    def _count(self, model: str, status: str) -> None:
        self._metrics.ollama_requests.labels(model, status).inc()

    # -- start-up: make every configured model available ------------------------------
    async def start(self) -> None:
        """Make every configured model available. In `ollama` mode a failure is a start-up
        error; in `hybrid` the model is marked unavailable: its tasks go to FALLBACK_MODELS
        if configured there, else they fail with the reason."""
        for model in self._models:
            try:
                await self.ensure_model(model)
            except ModelUnavailable as exc:
                if self._strict:
                    raise
                self.unavailable[model] = str(exc)
                self._log.error("ollama_model_unavailable", model=model, error=str(exc))

    async def check_models(self) -> list[str]:
        """Problems with the configured models, without pulling anything (for `check`)."""
        try:
            have = await self.pulled()
        except (httpx.HTTPError, ValueError) as exc:
            return [f"Ollama at {self._http.base_url} is unreachable ({type(exc).__name__}) — check OLLAMA_BASE_URL"]
        problems = []
        for model in self._models:
            if model not in have and _base_name(model) not in have:
                problems.append(f"{model} is not pulled (the daemon pulls it at start; or run `ollama pull {model}`)")
                continue
            resp = await self._http.post("/api/show", json={"model": model})
            caps = resp.json().get("capabilities") if resp.status_code == 200 else None
            if resp.status_code != 200:
                problems.append(f"{model}: /api/show answered {resp.status_code}")
            elif isinstance(caps, list) and "embedding" not in caps:
                problems.append(f"{model} is not an embedding model")
        return problems

    async def pulled(self) -> set[str]:
        resp = await self._http.get("/api/tags")
        resp.raise_for_status()
        names = set()
        for m in resp.json().get("models", []):
            for key in ("name", "model"):
                if isinstance(m.get(key), str):
                    names.add(m[key])
        return names

    async def _wait_until_reachable(self) -> set[str] | None:
        """The pulled models, waiting (with backoff) for an Ollama that is still starting.

        None when the server answers but has no usable `/api/tags` (a proxy or an older
        server): the model is then confirmed by embedding a probe instead.
        """
        deadline = trio.current_time() + min(self._download_timeout, STARTUP_WAIT)
        delay = 0.5
        while True:
            try:
                return await self.pulled()
            except httpx.HTTPStatusError:
                return None
            except (httpx.HTTPError, ValueError) as exc:
                if trio.current_time() + delay > deadline:
                    raise ModelUnavailable(
                        f"Ollama at {self._http.base_url} is unreachable ({type(exc).__name__}) — check OLLAMA_BASE_URL"
                    ) from None
                self._log.warning("ollama_waiting", url=str(self._http.base_url), error=type(exc).__name__, retry_in=delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def ensure_model(self, model: str) -> int:
        """Pull `model` if missing, check it embeds, learn its vector size."""
        have = await self._wait_until_reachable()
        if have is not None and model not in have and _base_name(model) not in have:
            try:
                await self.pull(model)
            except ModelUnavailable as exc:
                return await self._probe_embed(model, str(exc))
        try:
            resp = await self._http.post("/api/show", json={"model": model})
        except httpx.HTTPError as exc:
            raise ModelUnavailable(f"/api/show failed ({type(exc).__name__})") from None
        if resp.status_code != 200:
            # no usable /api/show: an embedding that works is proof enough
            return await self._probe_embed(model, f"/api/show answered {resp.status_code}: {_error_text(resp)}")
        info = resp.json()
        caps = info.get("capabilities")
        if isinstance(caps, list) and "embedding" not in caps:
            raise ModelUnavailable(f"{model} is not an embedding model (capabilities: {', '.join(map(str, caps))})")
        dim = _embedding_length(info.get("model_info") or {})
        if dim:
            self._dims[model] = dim
        self.unavailable.pop(model, None)
        self._log.info("ollama_model_ready", model=model, dimensions=dim)
        return dim or 0

    async def _probe_embed(self, model: str, why: str) -> int:
        self._pulled_after_404.add(model)  # the probe's own 404 must not start another pull
        try:
            res = await self.embed(model, ["probe"])
        except EmbedError as exc:
            raise ModelUnavailable(f"{why}; a probe embedding failed too: {exc}") from None
        dim = len(res.vectors[0]) if res.vectors and isinstance(res.vectors[0], list) else 0
        if dim:
            self._dims[model] = dim
        self.unavailable.pop(model, None)
        self._log.warning("ollama_model_confirmed_by_probe", model=model, dimensions=dim, why=why)
        return dim

    async def pull(self, model: str) -> None:
        self._log.info("ollama_pull_started", model=model)
        last_pct = -10
        with trio.move_on_after(self._download_timeout) as scope:
            try:
                async with self._http.stream("POST", "/api/pull", json={"model": model, "stream": True}, timeout=None) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        raise ModelUnavailable(f"pull answered {resp.status_code}: {_error_text(resp)}")
                    async for line in resp.aiter_lines():
                        if not line.strip():
                            continue
                        try:
                            event = orjson.loads(line)
                        except orjson.JSONDecodeError:
                            continue
                        if "error" in event:
                            raise ModelUnavailable(f"pull failed: {event['error']}")
                        total, done = event.get("total"), event.get("completed")
                        if isinstance(total, int) and total > 0 and isinstance(done, int):
                            pct = int(100 * done / total)
                            if pct >= last_pct + 10:
                                last_pct = pct
                                self._log.info("ollama_pull_progress", model=model, percent=pct, status=event.get("status"))
                        if event.get("status") == "success":
                            self._log.info("ollama_pull_done", model=model)
                            return
            except httpx.HTTPError as exc:
                raise ModelUnavailable(f"pull interrupted ({type(exc).__name__})") from None
            raise ModelUnavailable("pull stream ended without success")
        if scope.cancelled_caught:
            raise ModelUnavailable(f"pull did not finish within OLLAMA_MODEL_DOWNLOAD_TIMEOUT={self._download_timeout:g}s")

    async def probe(self, model: str) -> None:
        try:
            await self.pulled()
        except (httpx.HTTPError, ValueError) as exc:
            raise EmbedError(f"Ollama unreachable: {type(exc).__name__}", EmbedErrorKind.TRANSIENT) from None

    async def aclose(self) -> None:
        await self._http.aclose()


def _embedding_length(model_info: dict[str, Any]) -> int | None:
    for key, value in model_info.items():
        if key.endswith(".embedding_length") and isinstance(value, int):
            return value
    return None


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])[:300]
    except ValueError:
        pass
    return resp.text[:300]
