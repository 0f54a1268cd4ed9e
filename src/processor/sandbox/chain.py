"""The sandbox playing the platform's triage chain (CONTRACT.md §6).

`Chain.seed(n)` creates one claim per verification request: a `text_embedding` task with
`{text, model}`. When a result is accepted by the "callback", the next tasks of the chain
are created for the same target: `identifying_data` after the embedding, `defining_topics`
and `defining_impact_area` after it, `defining_severity` once both of those are in, with
their results as its content. Each step's next tasks are created once per target.

The callback refuses (400, the state already `succeeded`, as the real API does) what the
platform would refuse: a result of the wrong shape for its type. This check is written
here, independently of the processor's own validation (`processor.pure.triage`), so that a
mistake in one is caught by the other. A result identical to the last one accepted for a
field is ignored (the platform keeps a fingerprint per field).

Wired into the sandbox by `SandboxState.on_result` (one hook call in `app.py`).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from typing import Any

import attrs
import orjson

from processor.sandbox.app import SandboxState

SEVERITIES = {"low_1", "low_2", "low_3", "medium_1", "medium_2", "medium_3", "high_1", "high_2", "high_3", "critical"}
AREAS = ("Segurança Pública", "Saúde", "Política", "Corrupção e Transparência", "Justiça e Direitos Humanos", "Economia",
         "Meio Ambiente", "Educação", "Relações Internacionais", "Infraestrutura e Mobilidade", "Ciência e Tecnologia",
         "Cultura e Esporte", "Outros")
STEPS = {  # type -> (field, callbackRoute)
    "text_embedding": ("embedding", "verification_update_embedding"),
    "identifying_data": ("identifiedData", "verification_update_identifying_data"),
    "defining_topics": ("topics", "verification_update_defining_topics"),
    "defining_impact_area": ("impactArea", "verification_update_defining_impact_area"),
    "defining_severity": ("severity", "verification_update_defining_severity"),
}
_QID = re.compile(r"^Q\d+$")

PEOPLE = ("João Silva", "Maria Oliveira", "Luiz Inácio Lula da Silva", "Jair Bolsonaro", "Marina Silva", "Ana Souza",
          "Carlos Pereira", "Fernanda Lima")
SUBJECTS = ("a vacina contra a gripe", "o preço da gasolina", "o desmatamento na Amazônia", "as urnas eletrônicas",
            "a reforma da previdência", "o novo hospital de Recife", "as escolas públicas", "o metrô de São Paulo")
CLAIMS = (
    "{p} afirmou que {s} vai acabar no próximo mês.",
    "Segundo {p}, {s} foi decidido em segredo pelo governo.",
    "É falso que {s} custou o dobro, disse {p} em entrevista.",
    "Vídeo mostra {p} dizendo que {s} causa doenças graves.",
)


def claim_text(i: int) -> str:
    h = hashlib.sha256(str(i).encode()).digest()
    p1, p2, s = PEOPLE[h[0] % len(PEOPLE)], PEOPLE[h[1] % len(PEOPLE)], SUBJECTS[h[2] % len(SUBJECTS)]
    text = CLAIMS[h[3] % len(CLAIMS)].format(p=p1, s=s)
    if h[4] % 2:
        text += f" {p2} negou a informação."
    return f"[{i}] {text}"


def _slug(name: str) -> str:
    ascii_only = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    return re.sub(r"[^a-z0-9]+", "-", ascii_only.lower()).strip("-")


def _str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def refusal(task_type: str, result: Any) -> str | None:
    """Why the platform's callback would refuse `result` for `task_type` (None: accepted)."""
    if task_type == "text_embedding":
        ok = isinstance(result, list) and result and all(isinstance(x, int | float) and not isinstance(x, bool) for x in result)
        return None if ok else "embedding must be a non-empty array of numbers"
    if task_type == "identifying_data":
        if not isinstance(result, dict) or not isinstance(result.get("personalities"), list):
            return "identifiedData must be {personalities: [...]}"
        for p in result["personalities"]:
            if not isinstance(p, dict) or not _str(p.get("name")):
                return "each personality needs a name"
            wiki = p.get("wikidata")
            if wiki is not None and (not isinstance(wiki, dict) or not _QID.match(str(wiki.get("id", "")))):
                return "personality.wikidata.id must be a Q-id"
        return None
    if task_type == "defining_topics":
        if not isinstance(result, list) or not result:
            return "topics must be a non-empty array"
        for t in result:
            if not isinstance(t, dict) or not _str(t.get("name")) or not isinstance(t.get("language"), str):
                return "each topic needs a name and a language"
            if t.get("wikidataId") is not None and not _QID.match(str(t["wikidataId"])):
                return "topic.wikidataId must be a Q-id or null"
        return None
    if task_type == "defining_impact_area":
        if not isinstance(result, dict) or not _str(result.get("name")) or not isinstance(result.get("language"), str):
            return "impactArea must be {name, language, ...}"
        if result.get("wikidataId") is not None and not _QID.match(str(result["wikidataId"])):
            return "impactArea.wikidataId must be a Q-id or null"
        return None
    if task_type == "defining_severity":
        level = result.get("severity") if isinstance(result, dict) else result
        return None if level in SEVERITIES else "severity must be one of the ten levels"
    return None


@attrs.define
class Target:
    text: str
    results: dict[str, Any] = attrs.field(factory=dict)  # field -> accepted result
    fingerprints: dict[str, str] = attrs.field(factory=dict)
    created: set[str] = attrs.field(factory=set)  # task types created for this target


@attrs.define
class Chain:
    state: SandboxState
    chat_model: str = "o3"
    embedding_model: str = "nomic-embed-text"
    options: list[str] | None = None  # content.options of defining_impact_area tasks
    targets: dict[str, Target] = attrs.field(factory=dict)
    refused: Counter[str] = attrs.field(factory=Counter)  # by type
    refusals: list[tuple[str, str]] = attrs.field(factory=list)  # (task id, reason)
    accepted: Counter[str] = attrs.field(factory=Counter)
    ignored_repeats: int = 0
    route_names: dict[str, str] = attrs.field(factory=dict)  # type -> route to use instead (renamed routes)

    def __attrs_post_init__(self) -> None:
        self.state.on_result = self.on_result

    def seed(self, n: int, *, start: int = 0) -> list[str]:
        """n claims, each a `text_embedding` task; returns the target ids."""
        out = []
        for i in range(start, start + n):
            target = hashlib.sha256(f"target-{i}-{id(self)}".encode()).hexdigest()[:24]
            self.targets[target] = Target(claim_text(i))
            self._create(target, "text_embedding", {"text": self.targets[target].text, "model": self.embedding_model})
            out.append(target)
        return out

    def _create(self, target: str, task_type: str, content: dict[str, Any]) -> None:
        field, route = STEPS[task_type]
        self.targets[target].created.add(task_type)
        self.state.create({"type": task_type, "content": content, "callbackRoute": self.route_names.get(task_type, route),
                           "callbackParams": {"targetId": target, "field": field}})

    def on_result(self, st: SandboxState, task: dict[str, Any], result: Any) -> str | None:
        """The callback: None when accepted (and the next tasks created), else the reason."""
        task_type = str(task.get("type"))
        params = task.get("callbackParams") or {}
        target = self.targets.get(str(params.get("targetId")))
        if task_type not in STEPS or target is None:
            return None  # not a chain task: plain sandbox behaviour
        why = refusal(task_type, result)
        if why is not None:
            self.refused[task_type] += 1
            self.refusals.append((str(task.get("_id")), why))
            return why
        field = STEPS[task_type][0]
        fingerprint = hashlib.sha1(orjson.dumps(result)).hexdigest()
        if target.fingerprints.get(field) == fingerprint:
            self.ignored_repeats += 1
            return None
        target.fingerprints[field] = fingerprint
        target.results[field] = result
        self.accepted[task_type] += 1
        self._next(params["targetId"], target)
        return None

    def _next(self, target_id: str, target: Target) -> None:
        base = {"text": target.text, "model": self.chat_model}
        r = target.results
        if "embedding" in r and "identifying_data" not in target.created:
            self._create(target_id, "identifying_data", base)
        if "identifiedData" in r:
            if "defining_topics" not in target.created:
                self._create(target_id, "defining_topics", base)
            if "defining_impact_area" not in target.created:
                self._create(target_id, "defining_impact_area", {**base, **({"options": self.options} if self.options else {})})
        if "topics" in r and "impactArea" in r and "defining_severity" not in target.created:
            area = r["impactArea"]
            self._create(target_id, "defining_severity", {
                **base,
                "impactArea": {"name": area["name"], "language": area.get("language", "pt"), "wikidataId": area.get("wikidataId")},
                "topics": [{"name": t["name"], "language": t.get("language", "pt"), "wikidataId": t.get("wikidataId")} for t in r["topics"]],
                "personalities": [{"name": p["name"], "wikidataId": (p.get("wikidata") or {}).get("id")}
                                  for p in r.get("identifiedData", {}).get("personalities", [])],
            })

    def complete(self) -> int:
        """Targets whose severity was accepted."""
        return sum(1 for t in self.targets.values() if "severity" in t.results)

    def summary(self) -> dict[str, Any]:
        return {"targets": len(self.targets), "complete": self.complete(), "accepted": dict(self.accepted),
                "refused": dict(self.refused), "ignored_repeats": self.ignored_repeats}
