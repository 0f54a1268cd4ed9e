"""Ollama embeddings over its HTTP API (CONTRACT.md §4), a thin httpx adapter.

`/api/embed` takes a list of inputs (batching is what speeds Ollama up; concurrency does
not: it runs one request per model at a time, so requests per model are serialised here).
At start, each of SUPPORTED_MODELS is checked with `/api/tags`, pulled if missing (progress
logged, bounded by OLLAMA_MODEL_DOWNLOAD_TIMEOUT) and confirmed with `/api/show` as an
embedding model whose vector size is learnt.

In `hybrid` mode an Ollama that does not answer at start does not stop the start, and its
models are not given up: each is checked on first use (and by `maintain` in the
background), and until then every call is an EmbedError UNREACHABLE. A model this Ollama
cannot serve (the pull failed, not an embedding model) is an EmbedError MODEL_MISSING; the
models that cannot be used right now, and why, are in `unavailable`.

Every failure is classified into a `Fault`; nothing foreign leaves this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs
import httpx
import orjson
import trio

from processor.effects.backends.base import (
    EmbedError,
    EmbedResult,
    RequestLimits,
    checked_vectors,
    classify_status,
    estimate_tokens,
    parameter_hint,
    retry_after,
    short,
)
from processor.effects.logs import get_logger
from processor.effects.metrics import Metrics
from processor.effects.retrying import retrying
from processor.pure.faults import Fault

PER_INPUT_TIMEOUT = 1.0  # seconds added to OLLAMA_TIMEOUT per input of a batch
STARTUP_WAIT = 60.0  # how long the start waits for an Ollama that is not answering yet
RECHECK_INTERVAL = 30.0  # how often `maintain` looks again at models that cannot be used
_INTEGER = re.compile(r"[+-]?\d+")


class ModelUnavailable(Exception):
    """A configured model cannot be made available (pull failed, not an embedding model)."""


class OllamaNotAnswering(ModelUnavailable):
    """Ollama itself did not answer (connection refused, reset, timeout): nothing is known
    about the model yet."""


def keep_alive_wire(value: str | int) -> int | str:
    """OLLAMA_KEEP_ALIVE as Ollama's duration parser takes it: a JSON number of seconds
    (`-1` keeps the model loaded, `0` unloads it at once) or a duration string (`5m`)."""
    if isinstance(value, int):
        return value
    v = value.strip()
    return int(v) if _INTEGER.fullmatch(v) else v


def _base_name(model: str) -> str:
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


class OllamaApi:
    """The transport: Ollama's HTTP endpoints, each answer classified. One `/api/embed` per
    model at a time (Ollama runs them one by one anyway). `down` says why Ollama did not
    answer, None once it answers again."""

    def __init__(self, *, base_url: str, timeout: float, download_timeout: float, keep_alive: str | int,
                 truncate: bool, metrics: Metrics) -> None:
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=httpx.Timeout(timeout, connect=10))
        self._timeout = timeout
        self.download_timeout = download_timeout
        self._keep_alive = keep_alive_wire(keep_alive)
        self._truncate = truncate
        self._metrics = metrics
        self._locks: dict[str, trio.Lock] = {}
        self.down: str | None = None
        self._log = get_logger("ollama")

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    def timeout_for(self, n: int) -> float:
        return self._timeout + PER_INPUT_TIMEOUT * n

    async def embed(self, model: str, texts: Sequence[str], *, timeout: float | None, expected_dim: int | None) -> tuple[EmbedResult, int]:
        """One `/api/embed` call, classified: the result and the vectors' size."""
        body = {"model": model, "input": list(texts), "truncate": self._truncate, "keep_alive": self._keep_alive}
        lock = self._locks.setdefault(model, trio.Lock())
        async with lock:
            try:
                resp = await self._http.post("/api/embed", content=orjson.dumps(body), timeout=self.timeout_for(len(texts)) if timeout is None else timeout,
                                             headers={"Content-Type": "application/json"})
            except httpx.TimeoutException:
                self._count(model, "timeout")
                limit = f"{timeout:g}s" if timeout is not None else f"OLLAMA_TIMEOUT={self._timeout:g}s + {PER_INPUT_TIMEOUT:g}s per input"
                raise EmbedError(f"Ollama timed out on a batch of {len(texts)} ({limit})", Fault.TIMEOUT) from None
            except Exception as exc:  # connection refused / reset, DNS, a broken proxy: no answer
                self._count(model, "connection_error")
                raise self.not_answering(exc) from None
        self.down = None
        if resp.status_code == 200:
            return self._answer(model, texts, resp, expected_dim)
        self._count(model, str(resp.status_code))
        raise self._classify(resp)

    def _answer(self, model: str, texts: Sequence[str], resp: httpx.Response, expected_dim: int | None) -> tuple[EmbedResult, int]:
        try:
            data = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            self._count(model, "malformed")
            raise EmbedError(f"Ollama returned a malformed answer: the body is not JSON ({short(resp.text, 60)!r})", Fault.MALFORMED) from None
        if not isinstance(data, dict):
            self._count(model, "malformed")
            raise EmbedError(f"Ollama returned a malformed answer: the body is a {type(data).__name__}, not an object", Fault.MALFORMED)
        raw = data.get("embeddings")
        try:
            vectors, dim = checked_vectors(raw, len(texts), expected_dim, who=f"Ollama {model}",
                                           dimension_hint=lambda got: f"the model answered {got}-dimensional vectors, not the {expected_dim} it declared: check the model on OLLAMA_BASE_URL")
        except EmbedError as exc:
            self._count(model, "malformed" if exc.fault is Fault.MALFORMED else "dimension")
            raise
        self._count(model, "success")
        tokens = data.get("prompt_eval_count")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            tokens = sum(estimate_tokens(t) for t in texts)
        self._metrics.ollama_tokens.labels(model, "prompt").inc(tokens)
        return EmbedResult(vectors, tokens), dim

    def _classify(self, resp: httpx.Response) -> EmbedError:
        status = resp.status_code
        text = _error_text(resp)
        got = classify_status(status, text)
        message = f"Ollama {status}: {text}"
        if got.fault is Fault.PARAMETER:
            message += f" ({parameter_hint(got.param, 'OLLAMA_BASE_URL')})"
        wait = retry_after(resp.headers) if got.fault in (Fault.RATE_LIMITED, Fault.BUSY) else None
        return EmbedError(message, got.fault, status=status, retry_after=wait, param=got.param)

    def not_answering(self, exc: BaseException) -> EmbedError:
        self.down = f"Ollama at {self._http.base_url} is unreachable ({type(exc).__name__}) — check OLLAMA_BASE_URL"
        return EmbedError(self.down, Fault.UNREACHABLE)

    def _count(self, model: str, status: str) -> None:
        self._metrics.ollama_requests.labels(model, status).inc()

    async def tags(self) -> set[str] | None:
        """The pulled models; None when the server answers without a usable `/api/tags` (a
        proxy or an older server); OllamaNotAnswering when it does not answer."""
        try:
            resp = await self._http.get("/api/tags")
        except Exception as exc:
            raise OllamaNotAnswering(str(self.not_answering(exc))) from None
        self.down = None
        body = _ok_json(resp)
        models = body.get("models") if isinstance(body, dict) else None
        if not isinstance(models, list):
            return None
        names = set()
        for m in models:
            if isinstance(m, dict):
                for key in ("name", "model"):
                    if isinstance(m.get(key), str):
                        names.add(m[key])
        return names

    async def show(self, model: str) -> dict[str, Any] | None:
        """`/api/show` details; None when the server has no usable `/api/show`."""
        try:
            resp = await self._http.post("/api/show", json={"model": model})
        except Exception as exc:
            raise OllamaNotAnswering(str(self.not_answering(exc))) from None
        info = _ok_json(resp)
        return info if isinstance(info, dict) else None

    async def pull(self, model: str) -> None:
        """Pull with progress logged; ModelUnavailable (OllamaNotAnswering when the
        connection failed) unless the stream ends in `success`."""
        self._log.info("ollama_pull_started", model=model)
        last_pct = -10
        with trio.move_on_after(self.download_timeout) as scope:
            try:
                async with self._http.stream("POST", "/api/pull", json={"model": model, "stream": True}, timeout=None) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        raise ModelUnavailable(f"pull answered {resp.status_code}: {_error_text(resp)}")
                    async for line in resp.aiter_lines():
                        try:
                            event = orjson.loads(line) if line.strip() else None
                        except orjson.JSONDecodeError:
                            continue
                        if not isinstance(event, dict):
                            continue
                        if "error" in event:
                            raise ModelUnavailable(f"pull failed: {short(str(event['error']))}")
                        total, done = event.get("total"), event.get("completed")
                        if isinstance(total, int) and total > 0 and isinstance(done, int):
                            pct = int(100 * done / total)
                            if pct >= last_pct + 10:
                                last_pct = pct
                                self._log.info("ollama_pull_progress", model=model, percent=pct, status=short(str(event.get("status")), 80))
                        if event.get("status") == "success":
                            self._log.info("ollama_pull_done", model=model)
                            return
            except ModelUnavailable:
                raise
            except Exception as exc:  # connection lost mid-stream, a broken chunk, ...
                raise OllamaNotAnswering(f"pull of {model} interrupted ({type(exc).__name__})") from None
            raise ModelUnavailable("pull stream ended without success")
        if scope.cancelled_caught:
            raise ModelUnavailable(f"pull did not finish within OLLAMA_MODEL_DOWNLOAD_TIMEOUT={self.download_timeout:g}s")

    async def aclose(self) -> None:
        await self._http.aclose()


@attrs.define
class Residency:
    """What is known of each model on this Ollama: checked (pulled, an embedding model) and
    its vector size, or why it cannot be served; pulled once after a 404."""

    models: list[str]
    dims: dict[str, int] = attrs.field(factory=dict)
    ready: set[str] = attrs.field(factory=set)
    missing: dict[str, str] = attrs.field(factory=dict)  # model -> why this Ollama cannot serve it
    pulled_after_404: set[str] = attrs.field(factory=set)
    check_locks: dict[str, trio.Lock] = attrs.field(factory=dict)

    def unavailable(self, down: str | None) -> Mapping[str, str]:
        out = dict(self.missing)
        if down is not None:
            for model in self.models:
                out.setdefault(model, down)
        return MappingProxyType(out)

    def mark_missing(self, model: str, why: str) -> bool:
        """Record why `model` cannot be served; True when it was not known to be missing."""
        self.ready.discard(model)
        new = model not in self.missing
        self.missing[model] = why
        return new

    def now_ready(self, model: str, dim: int | None) -> None:
        if dim:
            self.dims[model] = dim
        self.ready.add(model)
        self.missing.pop(model, None)


class OllamaBackend:
    """The embedding backend over `OllamaApi`: makes the configured models available
    (`Residency`) and serves embeddings from the ready ones."""

    name = "ollama"

    def __init__(
        self,
        *,
        base_url: str,
        models: Sequence[str],
        timeout: float,
        download_timeout: float,
        keep_alive: str | int,
        truncate: bool,
        max_batch: int,
        metrics: Metrics,
        strict: bool = True,
    ) -> None:
        self._api = OllamaApi(base_url=base_url, timeout=timeout, download_timeout=download_timeout,
                              keep_alive=keep_alive, truncate=truncate, metrics=metrics)
        self._models = Residency(list(models))
        self._max_batch = max_batch
        self._strict = strict  # ollama mode: a model that cannot be made available stops the start
        self._log = get_logger("ollama")

    # -- what can be used right now -----------------------------------------------------
    @property
    def unavailable(self) -> Mapping[str, str]:
        """Models that cannot be used right now, and why (read-only, for /health)."""
        return self._models.unavailable(self._api.down)

    @property
    def down(self) -> str | None:
        """Why Ollama is not answering; None when its last answer came."""
        return self._api.down

    def limits(self, model: str) -> RequestLimits:
        return RequestLimits(self._max_batch)

    def expected_dim(self, model: str) -> int | None:
        return self._models.dims.get(model)

    def learn_dim(self, model: str, dim: int) -> None:
        self._models.dims.setdefault(model, dim)

    def timeout_for(self, n: int) -> float:
        return self._api.timeout_for(n)

    # -- embedding ------------------------------------------------------------------------
    async def embed(self, model: str, texts: Sequence[str], *, timeout: float | None = None) -> EmbedResult:
        m = self._models
        if model in m.missing:
            raise EmbedError(f"model {model!r} is unavailable on Ollama: {m.missing[model]}", Fault.MODEL_MISSING)
        if model not in m.ready:
            await self._check_lazily(model)
        try:
            return await self._request(model, texts, timeout)
        except EmbedError as exc:
            if exc.fault is not Fault.MODEL_MISSING or exc.status != 404 or model in m.pulled_after_404:
                if exc.fault is Fault.MODEL_MISSING:
                    self._mark_missing(model, str(exc))
                raise
        # a model that went missing since it was checked (deleted): pull it once, ask again
        m.pulled_after_404.add(model)
        m.ready.discard(model)
        try:
            await self.ensure_model(model, wait=False)
        except OllamaNotAnswering as exc:
            raise EmbedError(str(exc), Fault.UNREACHABLE) from None
        except ModelUnavailable as exc:
            self._mark_missing(model, str(exc))
            raise EmbedError(f"model {model!r} not found on Ollama and could not be pulled: {exc}", Fault.MODEL_MISSING, status=404) from None
        try:
            return await self._request(model, texts, timeout)
        except EmbedError as exc:
            if exc.fault is Fault.MODEL_MISSING:
                self._mark_missing(model, str(exc))
            raise

    async def _check_lazily(self, model: str) -> None:
        """First use of a model not checked at start (Ollama was not answering then)."""
        m = self._models
        lock = m.check_locks.setdefault(model, trio.Lock())
        async with lock:
            if model in m.ready:
                return
            if model in m.missing:
                raise EmbedError(f"model {model!r} is unavailable on Ollama: {m.missing[model]}", Fault.MODEL_MISSING)
            try:
                await self.ensure_model(model, wait=False)
            except OllamaNotAnswering as exc:
                raise EmbedError(str(exc), Fault.UNREACHABLE) from None
            except ModelUnavailable as exc:
                self._mark_missing(model, str(exc))
                raise EmbedError(f"model {model!r} is unavailable on Ollama: {exc}", Fault.MODEL_MISSING) from None

    def _mark_missing(self, model: str, why: str) -> None:
        if self._models.mark_missing(model, why):
            self._log.error("ollama_model_unavailable", model=model, error=why)

    async def _request(self, model: str, texts: Sequence[str], timeout: float | None = None) -> EmbedResult:
        result, dim = await self._api.embed(model, texts, timeout=timeout, expected_dim=self._models.dims.get(model))
        self.learn_dim(model, dim)
        return result

    # -- start-up: make every configured model available ------------------------------
    async def start(self) -> None:
        """Make every configured model available. In `ollama` mode a failure is a start-up
        error. In `hybrid` a model that cannot be made available is recorded in `unavailable`
        (its calls are MODEL_MISSING); an Ollama that does not answer within the start wait
        leaves its models to be checked on first use."""
        for model in self._models.models:
            try:
                await self.ensure_model(model, wait=True)
            except OllamaNotAnswering as exc:
                if self._strict:
                    raise
                self._log.error("ollama_not_answering", error=str(exc), models=self._models.models,
                                action="the models are checked on first use; their tasks wait")
                return
            except ModelUnavailable as exc:
                if self._strict:
                    raise
                self._mark_missing(model, str(exc))

    async def maintain(self, *, interval: float = RECHECK_INTERVAL) -> None:
        """Run for the life of the daemon: look again at the models in `unavailable`, so that
        an Ollama that comes up later, or a model pulled by hand, is used without a restart."""
        while True:
            await trio.sleep(interval)
            try:
                await self.recheck()
            except Exception as exc:  # a bug here must not end the daemon
                self._log.error("ollama_recheck_failed", error=f"{type(exc).__name__}: {short(str(exc), 200)}")

    async def recheck(self) -> None:
        """One look at each unavailable model (no pull for a model whose pull already failed)."""
        m = self._models
        for model in list(self.unavailable):
            if model in m.ready:
                continue
            try:
                await self.ensure_model(model, wait=False, pull=model not in m.missing)
            except OllamaNotAnswering:
                return  # still down: the others would fail the same way
            except ModelUnavailable as exc:
                if model in m.missing:
                    m.missing[model] = str(exc)
                else:
                    self._mark_missing(model, str(exc))
            else:
                m.missing.pop(model, None)

    async def check_models(self) -> list[str]:
        """Problems with the configured models, without pulling anything (for `check`)."""
        try:
            have = await self._api.tags()
        except OllamaNotAnswering as exc:
            return [str(exc)]
        problems = []
        for model in self._models.models:
            if have is not None and model not in have and _base_name(model) not in have:
                problems.append(f"{model} is not pulled (the daemon pulls it at start; or run `ollama pull {model}`)")
                continue
            try:
                info = await self._api.show(model)
            except ModelUnavailable as exc:
                problems.append(f"{model}: {exc}")
                continue
            caps = info.get("capabilities") if info is not None else None
            if isinstance(caps, list) and "embedding" not in caps:
                problems.append(f"{model} is not an embedding model")
        return problems

    async def pulled(self) -> set[str]:
        """The names of the pulled models; ModelUnavailable when `/api/tags` gives none."""
        have = await self._api.tags()
        if have is None:
            raise ModelUnavailable("/api/tags gave no list of models")
        return have

    async def _wait_until_reachable(self) -> set[str] | None:
        """`tags`, waiting (with backoff, within the start wait) for an Ollama that is still
        starting."""

        def still_starting(exc: BaseException) -> bool:
            if isinstance(exc, OllamaNotAnswering):
                self._log.warning("ollama_waiting", url=self._api.base_url, error=str(exc))
                return True
            return False

        async for attempt in retrying(name="ollama_start", on=still_starting, attempts=1000,
                                      timeout=min(self._api.download_timeout, STARTUP_WAIT), base=0.5, cap=10.0):
            with attempt:
                return await self._api.tags()
        raise AssertionError("unreachable")  # pragma: no cover: retrying re-raises the last error

    async def ensure_model(self, model: str, *, wait: bool = True, pull: bool = True) -> int:
        """Pull `model` if missing, check it embeds, learn its vector size. OllamaNotAnswering
        when Ollama does not answer (after the start wait when `wait`), ModelUnavailable when
        it answers but cannot serve the model."""
        have = await (self._wait_until_reachable() if wait else self._api.tags())
        if have is not None and model not in have and _base_name(model) not in have:
            if not pull:
                raise ModelUnavailable(f"{model} is not pulled on Ollama")
            self._models.pulled_after_404.add(model)  # a later 404 must not start another pull
            try:
                await self.pull(model)
            except OllamaNotAnswering:
                raise
            except ModelUnavailable as exc:
                return await self._probe_embed(model, str(exc))
        info = await self._api.show(model)
        if info is None:
            # no usable /api/show: an embedding that works is proof enough
            return await self._probe_embed(model, "/api/show gave no details")
        caps = info.get("capabilities")
        if isinstance(caps, list) and "embedding" not in caps:
            raise ModelUnavailable(f"{model} is not an embedding model (capabilities: {', '.join(map(str, caps))})")
        model_info = info.get("model_info")
        dim = _embedding_length(model_info if isinstance(model_info, dict) else {})
        self._models.now_ready(model, dim)
        self._log.info("ollama_model_ready", model=model, dimensions=dim)
        return dim or 0

    async def _probe_embed(self, model: str, why: str) -> int:
        try:
            res = await self._request(model, ["probe"])
        except EmbedError as exc:
            if exc.fault in (Fault.UNREACHABLE, Fault.TIMEOUT, Fault.BUSY, Fault.SERVER, Fault.RATE_LIMITED):
                raise OllamaNotAnswering(f"{why}; a probe embedding failed too: {exc}") from None
            raise ModelUnavailable(f"{why}; a probe embedding failed too: {exc}") from None
        dim = len(res.vectors[0]) if res.vectors else 0
        self._models.now_ready(model, dim)
        self._log.warning("ollama_model_confirmed_by_probe", model=model, dimensions=dim, why=why)
        return dim

    async def pull(self, model: str) -> None:
        """Pull with progress logged; ModelUnavailable (OllamaNotAnswering when the
        connection failed) unless the stream ends in `success`."""
        await self._api.pull(model)

    async def probe(self, model: str) -> None:
        """Raises EmbedError UNREACHABLE when Ollama does not answer."""
        try:
            await self._api.tags()
        except OllamaNotAnswering as exc:
            raise EmbedError(str(exc), Fault.UNREACHABLE) from None

    async def aclose(self) -> None:
        await self._api.aclose()


def _ok_json(resp: httpx.Response) -> Any:
    """The JSON body of a 200 answer; None for another status or a body that is not JSON."""
    if resp.status_code != 200:
        return None
    try:
        return orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return None


def _embedding_length(model_info: Mapping[str, Any]) -> int | None:
    for key, value in model_info.items():
        if isinstance(key, str) and key.endswith(".embedding_length") and isinstance(value, int) and value > 0:
            return value
    return None


def _error_text(resp: httpx.Response) -> str:
    try:
        body = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and "error" in body:
        err = body["error"]
        if isinstance(err, dict):
            err = err.get("message", err)
        return short(str(err))
    return short(resp.text) or resp.reason_phrase
