"""The four triage kinds (CONTRACT.md §6): one chat call per task, a JSON schema, a
validated answer, Wikidata ids when they can be had.

What a stage can rely on:
- `parse` is pure: a bare-string content, a missing text or model, bad `options` or a bad
  severity context is a `Defect` (the task is failed with the reason).
- `route` says which chat backend serves the task and which model is asked (MODEL_MAP
  applied): `mock` mode the mock; `openai` OpenAI; `ollama` Ollama, whatever the name
  (SUPPORTED_MODELS is for embeddings); `hybrid` OpenAI's names to OpenAI, others to Ollama.
- `group_key` is the task's id: every task is its own call (`max_group` 1).
- `compute` returns a `Computed` or, once CHAT_BAD_ANSWER_RETRIES more answers were bad
  too, a `ChatError` with `Fault.BAD_ANSWER` for this task (refused, cut off, not JSON, or
  outside what the callback accepts): the stage hands it back for later, counting an
  attempt (failed only past MAX_TASK_ATTEMPTS). Every other fault of
  the call (AUTH, QUOTA, RATE_LIMITED, BUSY, SERVER, TIMEOUT, UNREACHABLE, MALFORMED,
  MODEL_MISSING, PARAMETER) is raised as the adapter classified it. Wikidata never makes a
  task fail: when it is down or slow the result goes out without ids (`meta["wikidata"]`
  says why, and it is counted).
- `Computed.meta` carries what the report log needs: the model that answered, the model
  the task asked for, the template's version, the tokens, the Wikidata outcome.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import orjson
import trio

from processor.effects.chat.base import ChatError, ChatRequest
from processor.effects.logs import get_logger
from processor.effects.prompts import load_template
from processor.kinds.base import Computed, Content, Defect, KindPorts, Usage, Work, priced_model
from processor.pure import budget
from processor.pure import triage as tr
from processor.pure.faults import Dependency, DependencyError, Fault
from processor.pure.ratelimit import Demand
from processor.pure.tasks import Backend

PLATFORM_MODEL = "o3"  # what the platform sends for every triage type today (for `check`)
_BACKENDS = {tr.ChatRoute.OPENAI: Backend.OPENAI, tr.ChatRoute.OLLAMA: Backend.OLLAMA, tr.ChatRoute.MOCK: Backend.MOCK}


class TriageKind:
    dependency = Dependency.CHAT

    def __init__(
        self, task_type: tr.TriageType, *, template: tr.Template, mode: str, language: str = "pt",
        model_map: Mapping[str, str] | None = None, template_origin: str = "package", bad_answer_retries: int = 2,
        max_tokens: int = 8192,
    ) -> None:
        self._bad_answer_retries = bad_answer_retries
        self._max_tokens = max_tokens
        self.triage_type = task_type
        self.type = task_type.value
        self.template = template
        self.template_origin = template_origin
        self._mode = mode
        self._language = language
        self._model_map = dict(model_map or {})
        self._log = get_logger("triage").bind(task_type=self.type)

    # -- pure ------------------------------------------------------------------------------
    def parse(self, content: object) -> Content | Defect:
        claim = tr.parse_content(self.triage_type, content)
        if isinstance(claim, tr.Defect):
            return Defect("invalid_content", claim.reason)
        assert isinstance(content, dict)
        return Content(claim.text, claim.model, {"content": content})

    def route(self, content: Content) -> tuple[Backend, str]:
        """(backend, model to ask) for a parsed content."""
        requested = content.model or PLATFORM_MODEL
        model = tr.map_model(requested, self._model_map)
        return _BACKENDS[tr.chat_route(self._mode, model)], model

    def group_key(self, work: Work) -> Hashable:
        return (self.type, work.id)

    def max_group(self, work: Work, ports: KindPorts) -> int:
        return 1

    def claim_of(self, work: Work) -> tr.Claim:
        claim = tr.parse_content(self.triage_type, work.params.get("content"))
        if isinstance(claim, tr.Defect):  # cannot happen for a work built from `parse`
            raise DependencyError(f"{self.type}: {claim.reason}", Fault.INPUT)
        return claim

    def request(self, work: Work) -> tuple[tr.Claim, ChatRequest]:
        claim = self.claim_of(work)
        system, user = tr.render(self.template, claim, language=self._language)
        return claim, ChatRequest(work.model, system, user, tr.answer_schema(claim), tr.schema_name(self.triage_type), self.type)

    # -- effects ---------------------------------------------------------------------------
    async def compute(
        self, ports: KindPorts, works: Sequence[Work], *, timeout: float | None = None
    ) -> Sequence[Computed | DependencyError]:
        return [await self._one(ports, w, timeout) for w in works]

    async def _one(self, ports: KindPorts, work: Work, timeout: float | None) -> Computed | DependencyError:
        chat = ports.chat[work.backend]
        metrics = getattr(chat, "metrics", None)
        if work.requested_model and work.requested_model != work.model and metrics is not None:
            metrics.model_mapped.labels(work.requested_model, work.model).inc()
        claim, request = self.request(work)
        bad: ChatError | None = None
        used = Usage(0, 0)
        known = True  # every answer's tokens are known (a refused or cut-off one's are not)
        for asked in range(1 + self._bad_answer_retries):  # a bad answer is asked again at once, bounded
            if asked and ports.budget is not None and not await ports.budget.again(work):
                break  # a token or spend budget has no room for one more call: handed back for later
            try:
                if timeout is not None:
                    with trio.fail_after(timeout):
                        answer = await chat.complete(request)
                else:
                    answer = await chat.complete(request)
            except trio.TooSlowError:
                raise ChatError(f"{work.backend.value}/{work.model}: no answer within {timeout:g}s", Fault.TIMEOUT) from None
            except ChatError as exc:
                if exc.fault is not Fault.BAD_ANSWER:
                    raise
                self._bad(metrics, "unusable", str(exc))
                bad = exc
                known = False
                continue
            known = known and answer.prompt_tokens > 0  # 0: the answer carried no usage
            used = Usage(used.tokens_in + answer.prompt_tokens, used.tokens_out + answer.completion_tokens)
            verdict = tr.validate_answer(claim, answer.content_json)
            if isinstance(verdict, tr.BadAnswer):
                self._bad(metrics, "invalid", verdict.reason)
                bad = ChatError(f"{work.backend.value}/{work.model}: {verdict.reason}", Fault.BAD_ANSWER)
                continue
            return await self._result(ports, work, claim, answer, verdict, used if known else None)
        assert bad is not None
        return bad  # for this task alone: the stage hands it back for later (a persisted attempt)

    def demand(self, work: Work) -> Demand:
        """One call at most: what it sends (messages and answer schema, in UTF-8 bytes, plus
        framing) and its answer budget (CHAT_MAX_TOKENS), priced by the model asked. A bad
        answer asked again reserves one more call first (`KindPorts.budget`)."""
        _, request = self.request(work)
        tokens_in, tokens_out = budget.chat_bound(
            (request.system, request.user, orjson.dumps(request.schema).decode()), self._max_tokens)
        return Demand(tokens_in, tokens_out, priced_model(work))

    async def _result(self, ports: KindPorts, work: Work, claim: tr.Claim, answer: Any, verdict: tr.Answer,
                      usage: Usage | None = None) -> Computed:
        names, people = tr.lookups(verdict)
        ids: dict[str, Any] = {}
        wikidata = "none" if not names else "off"
        if names and ports.wikidata is not None:
            ids, degraded = await ports.wikidata.resolve(names, people=people)
            wikidata = degraded or "ok"
        result = tr.build_result(verdict, ids, language=self._language)
        meta = {
            "model": answer.model, "requested_model": work.requested_model or claim.model, "backend": work.backend.value,
            "template": self.template.version, "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens, "wikidata": wikidata,
        }
        self._log.info("triage_computed", task_id=work.id, **meta)
        return Computed(work.id, result, meta if usage is None else {**meta, "usage": usage})

    def _bad(self, metrics: Any, kind: str, reason: str) -> None:
        if metrics is not None:
            metrics.bad_answers.labels(self.type, kind).inc()
        self._log.info("chat_bad_answer", kind=kind, reason=reason[:200])

    async def check(self, ports: KindPorts) -> str:
        """Ask the chat model the platform sends (after MODEL_MAP) one question; raises
        ChatError when it cannot be served."""
        backend, model = self.route(Content("check", PLATFORM_MODEL))
        chat = ports.chat.get(backend)
        if chat is None:
            raise ChatError(f"no {backend.value} chat backend in this mode", Fault.MODEL_MISSING)
        detail: str = await chat.check(model)
        return f"{backend.value}: {detail}"


def make_kind(task_type: tr.TriageType, settings: Any) -> TriageKind:
    template, origin = load_template(task_type.value, getattr(settings, "prompts_dir", None))
    mode = getattr(settings, "processing_mode", "mock")
    model_map = getattr(settings, "model_map", {})
    get_logger("triage").info("triage_kind_ready", task_type=task_type.value, template=template.version, origin=origin,
                              model_map=model_map or None)
    return TriageKind(
        task_type, template=template, template_origin=origin, mode=getattr(mode, "value", str(mode)),
        language=getattr(settings, "output_language", "pt"), model_map=model_map,
        bad_answer_retries=getattr(settings, "chat_bad_answer_retries", 2),
        max_tokens=getattr(settings, "chat_max_tokens", 8192),
    )
