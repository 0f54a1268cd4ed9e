"""`text_embedding`: one vector per text, many texts per backend call (CONTRACT.md §1, §3, §4).

Content is `{text, model}` or, for older tasks, a bare string (the configured default
model applies). Tasks of the same backend and model share a call; the answer is checked
(one finite vector of the expected size per input) before it is reported as a flat array.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Sequence

from processor.kinds.base import Computed, Content, Defect, KindPorts, Usage, Work, priced_model
from processor.pure import vectors
from processor.pure.faults import Dependency, DependencyError, Fault
from processor.pure.ratelimit import Demand
from processor.pure.tasks import MAX_TEXT_CHARS, Backend

TYPE = "text_embedding"


def estimate_tokens(text: str) -> int:
    """A conservative token estimate without a tokenizer: one token per 3 UTF-8 bytes."""
    return len(text.encode("utf-8", "surrogatepass")) // 3 + 1


def truncate_to_tokens(text: str, tokens: int) -> str:
    """Cut `text` so that its (conservative) token estimate fits `tokens`."""
    if estimate_tokens(text) <= tokens:
        return text
    return text.encode("utf-8")[: 3 * (tokens - 1)].decode("utf-8", errors="ignore")


def parse_content(content: object) -> Content | Defect:
    if content is None:
        return Defect("missing_content", "content is missing or null")
    model: object = None
    text: object
    if isinstance(content, str):
        text = content
    elif isinstance(content, dict):
        text = content.get("text")
        model = content.get("model")
        if not isinstance(text, str):
            return Defect("invalid_content", f"content.text must be a string, got {type(text).__name__}")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            return Defect("invalid_model", "content.model must be a non-empty string")
    else:
        return Defect("invalid_content", f"content must be a string or {{text, model}}, got {type(content).__name__}")
    assert isinstance(text, str)
    if not text.strip():
        return Defect("empty_text", "text is empty")
    if len(text) > MAX_TEXT_CHARS:
        return Defect("text_too_long", f"text has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    return Content(text, model if isinstance(model, str) else None)


class EmbeddingKind:
    type = TYPE
    dependency = Dependency.EMBEDDING

    def __init__(self, *, truncate_openai: bool = False) -> None:
        self._truncate_openai = truncate_openai

    def parse(self, content: object) -> Content | Defect:
        return parse_content(content)

    def group_key(self, work: Work) -> Hashable:
        return (TYPE, work.backend, work.model)

    def max_group(self, work: Work, ports: KindPorts) -> int:
        return int(ports.embedding[work.backend].limits(work.model).max_items)

    def too_long(self, work: Work, ports: KindPorts) -> Defect | None:
        """A text over the backend's per-input limit (when it is not cut) is the task's defect."""
        limit = ports.embedding[work.backend].limits(work.model).max_input_tokens
        if limit is None or (self._truncate_openai and work.backend is Backend.OPENAI):
            return None
        n = estimate_tokens(work.text)
        if n <= limit:
            return None
        return Defect("text_too_long", f"text is too long for {work.model} (about {n} tokens; the limit is {limit})")

    def demand(self, work: Work) -> Demand:
        """At most the text's UTF-8 bytes (a cut text is shorter), priced by the task's model."""
        return Demand.upper_bound(work.text, priced_model(work))

    def texts(self, works: Sequence[Work], ports: KindPorts) -> list[str]:
        if not works:
            return []
        w = works[0]
        if self._truncate_openai and w.backend is Backend.OPENAI:
            limit = ports.embedding[w.backend].limits(w.model).max_input_tokens or 8192
            return [truncate_to_tokens(x.text, limit) for x in works]
        return [x.text for x in works]

    async def compute(
        self, ports: KindPorts, works: Sequence[Work], *, timeout: float | None = None
    ) -> Sequence[Computed | DependencyError]:
        w = works[0]
        adapter = ports.embedding[w.backend]
        texts = self.texts(works, ports)
        try:
            if timeout is not None and takes_timeout(adapter):
                result = await adapter.embed(w.model, texts, timeout=timeout)
            else:  # an adapter without a per-call timeout: the stage still bounds the call
                result = await adapter.embed(w.model, texts)
        except DependencyError:
            raise
        except Exception as exc:  # an adapter that still speaks the older vocabulary
            raise _as_dependency_error(exc) from None
        tokens = getattr(result, "prompt_tokens", None)
        return check(adapter, w, works, result.vectors, Usage(tokens) if isinstance(tokens, int) else None)


_TAKES_TIMEOUT: dict[type, bool] = {}


def takes_timeout(adapter: object) -> bool:
    """Whether the adapter's `embed` takes `timeout=` (the protocol's; older or plug-in
    adapters may not)."""
    kind = type(adapter)
    known = _TAKES_TIMEOUT.get(kind)
    if known is None:
        try:
            params = inspect.signature(adapter.embed).parameters  # type: ignore[attr-defined]
            known = "timeout" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            known = False
        _TAKES_TIMEOUT[kind] = known
    return known


def check(adapter: object, first: Work, works: Sequence[Work], raw: Sequence[object],
          usage: Usage | None = None) -> list[Computed | DependencyError]:
    """One finite vector of the expected size per input; a batch of one other size is the
    backend's configuration (DIMENSION), never the tasks' defect. `usage` (the call's
    tokens, when the backend said) goes in each result's meta."""
    expected = adapter.expected_dim(first.model)  # type: ignore[attr-defined]
    if not isinstance(raw, (list, tuple)) or len(raw) != len(works):
        n = len(raw) if isinstance(raw, (list, tuple)) else 0
        raise DependencyError(f"{first.backend.value} returned {n} vectors for {len(works)} inputs", Fault.MALFORMED)
    if expected is not None:
        sizes = {len(v) for v in raw if isinstance(v, (list, tuple))}
        if sizes and expected not in sizes and len(sizes) == 1:
            got = sizes.pop()
            raise DependencyError(
                f"{first.backend.value}/{first.model} returns {got}-dimensional vectors but EMBEDDING_DIMENSIONS is "
                f"{expected}: set EMBEDDING_DIMENSIONS={got} or use a model/server that honours `dimensions`",
                Fault.DIMENSION,
            )
    verdicts, dim = vectors.check_batch(raw, len(works), expected)
    if dim is not None and expected is None:
        adapter.learn_dim(first.model, dim)  # type: ignore[attr-defined]
    out: list[Computed | DependencyError] = []
    for work, verdict in zip(works, verdicts, strict=True):
        if isinstance(verdict, vectors.VectorOk):
            meta: dict[str, object] = {"model": work.model, "backend": work.backend.value}
            if usage is not None:
                meta["usage"] = usage
            out.append(Computed(work.id, verdict.vector, meta))
        else:
            out.append(DependencyError(f"{work.backend.value}/{work.model}: {verdict.reason}", Fault.MALFORMED))
    return out


_OLD_KINDS = {"input": Fault.INPUT, "model": Fault.MODEL_MISSING, "timeout": Fault.TIMEOUT,
              "rate_limited": Fault.RATE_LIMITED, "transient": Fault.SERVER, "backend_down": Fault.AUTH}


def _as_dependency_error(exc: Exception) -> DependencyError:
    kind = getattr(getattr(exc, "kind", None), "value", None)
    fault = _OLD_KINDS.get(kind, Fault.MALFORMED) if isinstance(kind, str) else Fault.MALFORMED
    if getattr(exc, "quota", False):
        fault = Fault.QUOTA
    elif getattr(exc, "unreachable", False):
        fault = Fault.UNREACHABLE
    elif fault is Fault.SERVER and getattr(exc, "status", None) == 503:
        fault = Fault.BUSY
    return DependencyError(str(exc) or type(exc).__name__, fault, status=getattr(exc, "status", None),
                           retry_after=getattr(exc, "retry_after", None))


def make(settings: object) -> EmbeddingKind:
    return EmbeddingKind(truncate_openai=bool(getattr(settings, "openai_truncate", False)))
