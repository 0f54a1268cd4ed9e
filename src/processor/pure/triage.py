"""The triage task types (CONTRACT.md §6): content, answer schemas, validation, results.

Pure: no I/O, no clock, no randomness. For each of the four types this module says
- how a task's `content` is parsed (`parse_content`): a `Claim`, or a `Defect` (the task
  can never succeed: report it failed with the reason);
- what JSON schema the model's answer must follow (`answer_schema`), strict as OpenAI
  wants it (every property required, `additionalProperties: false`);
- whether a model's answer is usable (`validate_answer`): an `Answer`, or a `BadAnswer`
  (the model's bad moment, not the task's defect: ask again);
- what result the platform's callback accepts (`build_result`), given the Wikidata ids
  found (or none: a result without ids is valid too).

The model's answer is untrusted (the claim text may carry instructions): validation is the
real guard. Every value that reaches a result passed through here.
"""

from __future__ import annotations

import enum
import json
import re
import string
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

MAX_TEXT_CHARS = 10_000
MAX_NAME_CHARS = 200
MAX_DESCRIPTION_CHARS = 500
MAX_PEOPLE = 50
MAX_TOPICS = 10
MAX_OPTIONS = 100


class TriageType(enum.Enum):
    IDENTIFYING_DATA = "identifying_data"
    DEFINING_TOPICS = "defining_topics"
    DEFINING_IMPACT_AREA = "defining_impact_area"
    DEFINING_SEVERITY = "defining_severity"


TRIAGE_TYPES = tuple(t.value for t in TriageType)

# The callback field each type fills (`callbackParams.field`).
FIELDS = {
    TriageType.IDENTIFYING_DATA: "identifiedData",
    TriageType.DEFINING_TOPICS: "topics",
    TriageType.DEFINING_IMPACT_AREA: "impactArea",
    TriageType.DEFINING_SEVERITY: "severity",
}

# callbackRoute values, current first, then older names (the platform renamed them).
ROUTES = {
    TriageType.IDENTIFYING_DATA: ("verification_update_identifying_data", "verification_update_identified_data"),
    TriageType.DEFINING_TOPICS: ("verification_update_defining_topics", "verification_update_topics"),
    TriageType.DEFINING_IMPACT_AREA: ("verification_update_defining_impact_area", "verification_update_impact_area"),
    TriageType.DEFINING_SEVERITY: ("verification_update_defining_severity", "verification_update_severity"),
}

SEVERITY_LEVELS = (
    "low_1", "low_2", "low_3", "medium_1", "medium_2", "medium_3", "high_1", "high_2", "high_3", "critical",
)

# The platform's closed list of impact areas; it maps any name onto it and falls back to "Outros".
IMPACT_AREAS = (
    "Segurança Pública", "Saúde", "Política", "Corrupção e Transparência", "Justiça e Direitos Humanos", "Economia",
    "Meio Ambiente", "Educação", "Relações Internacionais", "Infraestrutura e Mobilidade", "Ciência e Tecnologia",
    "Cultura e Esporte", "Outros",
)

_QID = re.compile(r"^Q[1-9][0-9]{0,11}$")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def slug(name: str) -> str:
    """The platform's matching key for a name: accents off, lower case, runs of other
    characters as one dash (`"São  Paulo!"` -> `"sao-paulo"`)."""
    decomposed = unicodedata.normalize("NFKD", name)
    ascii_only = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _NON_ALNUM.sub("-", ascii_only.casefold()).strip("-")


def is_qid(value: object) -> bool:
    return isinstance(value, str) and _QID.match(value) is not None


def clean_name(value: object, limit: int = MAX_NAME_CHARS) -> str | None:
    """A name fit for a result (whitespace collapsed, 1..limit characters, has a letter or
    digit), or None."""
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())
    if not text or len(text) > limit or not slug(text):
        return None
    return text


# --- content ----------------------------------------------------------------------------


@attrs.frozen
class Named:
    """A person, topic or area given in a severity task's content."""

    name: str
    wikidata_id: str | None = None


@attrs.frozen
class Claim:
    """A triage task's parsed content."""

    type: TriageType
    text: str
    model: str
    options: tuple[str, ...] | None = None  # impact area: the closed list to choose from
    impact_area: Named | None = None  # severity: context from the earlier steps
    topics: tuple[Named, ...] = ()
    personalities: tuple[Named, ...] = ()


@attrs.frozen
class Defect:
    """The task's content can never succeed: report `failed` with `reason`."""

    reason: str


def parse_content(task_type: TriageType, content: Any) -> Claim | Defect:
    """Parse `content` for one of the four types. Never raises."""
    if isinstance(content, str):
        return Defect(f"content is a bare string; {task_type.value} needs an object {{text, model}}")
    if not isinstance(content, dict):
        return Defect(f"content must be an object {{text, model}}, got {_type_name(content)}")
    text, model = content.get("text"), content.get("model")
    if not isinstance(text, str):
        return Defect(f"content.text must be a string, got {_type_name(text)}")
    if not text.strip():
        return Defect("content.text is empty")
    if len(text) > MAX_TEXT_CHARS:
        return Defect(f"content.text has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    if not isinstance(model, str) or not model.strip():
        return Defect("content.model must be a non-empty string")
    claim = Claim(task_type, text, model.strip())
    if task_type is TriageType.DEFINING_IMPACT_AREA:
        return _with_options(claim, content.get("options"))
    if task_type is TriageType.DEFINING_SEVERITY:
        return _with_context(claim, content)
    return claim


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _with_options(claim: Claim, options: Any) -> Claim | Defect:
    if options is None:
        return claim
    if not isinstance(options, list):
        return Defect(f"content.options must be a list of names, got {_type_name(options)}")
    names: list[str] = []
    seen: set[str] = set()
    for item in options:
        name = clean_name(item)
        if name is None:
            return Defect("content.options must hold non-empty names of at most 200 characters")
        if slug(name) not in seen:
            seen.add(slug(name))
            names.append(name)
    if not names:
        return Defect("content.options is empty: there is nothing to choose from")
    if len(names) > MAX_OPTIONS:
        return Defect(f"content.options has {len(names)} names; the limit is {MAX_OPTIONS}")
    return attrs.evolve(claim, options=tuple(names))


def _named(value: Any, where: str, id_key: str = "wikidataId") -> Named | Defect:
    if not isinstance(value, dict):
        return Defect(f"{where} must be an object {{name, ...}}, got {_type_name(value)}")
    name = clean_name(value.get("name"))
    if name is None:
        return Defect(f"{where}.name must be a non-empty string of at most {MAX_NAME_CHARS} characters")
    qid = value.get(id_key)
    if qid is None and id_key == "wikidataId" and isinstance(value.get("wikidata"), dict):
        qid = value["wikidata"].get("id")  # a personality as identifying_data reported it
    return Named(name, qid if is_qid(qid) else None)


def _with_context(claim: Claim, content: Mapping[str, Any]) -> Claim | Defect:
    area: Named | None = None
    if content.get("impactArea") is not None:
        parsed = _named(content["impactArea"], "content.impactArea")
        if isinstance(parsed, Defect):
            return parsed
        area = parsed
    lists: dict[str, tuple[Named, ...]] = {}
    for key in ("topics", "personalities"):
        raw = content.get(key, [])
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            return Defect(f"content.{key} must be a list, got {_type_name(raw)}")
        items: list[Named] = []
        for i, entry in enumerate(raw[: MAX_PEOPLE if key == "personalities" else MAX_TOPICS * 5]):
            parsed = _named(entry, f"content.{key}[{i}]")
            if isinstance(parsed, Defect):
                return parsed
            items.append(parsed)
        lists[key] = tuple(items)
    return attrs.evolve(claim, impact_area=area, topics=lists["topics"], personalities=lists["personalities"])


# --- answer schemas ------------------------------------------------------------------------


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _names_array() -> dict[str, Any]:
    return {"type": "array", "items": _object({"name": {"type": "string"}})}


def area_choices(claim: Claim) -> tuple[str, ...]:
    return claim.options if claim.options is not None else IMPACT_AREAS


def answer_schema(claim: Claim) -> dict[str, Any]:
    """The strict JSON schema of the model's answer for this claim."""
    t = claim.type
    if t is TriageType.IDENTIFYING_DATA:
        return _object({"personalities": _names_array()})
    if t is TriageType.DEFINING_TOPICS:
        return _object({"topics": _names_array()})
    if t is TriageType.DEFINING_IMPACT_AREA:
        return _object({"name": {"type": "string", "enum": list(area_choices(claim))}, "description": {"type": "string"}})
    return _object({"severity": {"type": "string", "enum": list(SEVERITY_LEVELS)}})


def schema_name(task_type: TriageType) -> str:
    return task_type.value


# --- answers ----------------------------------------------------------------------------------


@attrs.frozen
class Answer:
    """A usable answer, before Wikidata: `names` for people and topics, `name` and
    `description` for an area, `severity` for severity."""

    type: TriageType
    names: tuple[str, ...] = ()
    name: str | None = None
    description: str | None = None
    severity: str | None = None


@attrs.frozen
class BadAnswer:
    """The model's answer is unusable (a schema or meaning violation): ask again."""

    reason: str


def validate_answer(claim: Claim, content_json: str) -> Answer | BadAnswer:
    """Check the model's JSON answer against what the callback accepts. Never raises."""
    try:
        data = json.loads(content_json)
    except (ValueError, TypeError):
        return BadAnswer("the answer is not valid JSON")
    if not isinstance(data, dict):
        return BadAnswer(f"the answer must be a JSON object, got {_type_name(data)}")
    t = claim.type
    if t is TriageType.IDENTIFYING_DATA:
        names = _answer_names(data, "personalities")
        if isinstance(names, BadAnswer):
            return names
        return Answer(t, names=dedupe(names)[:MAX_PEOPLE])
    if t is TriageType.DEFINING_TOPICS:
        names = _answer_names(data, "topics")
        if isinstance(names, BadAnswer):
            return names
        topics = dedupe(names)[:MAX_TOPICS]
        if not topics:
            return BadAnswer("the answer lists no topic; at least one is required")
        return Answer(t, names=topics)
    if t is TriageType.DEFINING_IMPACT_AREA:
        return _answer_area(claim, data)
    return _answer_severity(data)


def _answer_names(data: Mapping[str, Any], key: str) -> tuple[str, ...] | BadAnswer:
    items = data.get(key)
    if not isinstance(items, list):
        return BadAnswer(f"`{key}` must be a list, got {_type_name(items)}")
    names = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("name")
        if not isinstance(item, str):
            return BadAnswer(f"`{key}` entries must be objects with a string `name`")
        name = clean_name(item)
        if name is not None:  # an empty or overlong name is dropped, not fatal
            names.append(name)
    return tuple(names)


def dedupe(names: Iterable[str]) -> tuple[str, ...]:
    """Names in first-seen order, one per slug (the platform's matching key)."""
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        key = slug(name)
        if key and key not in seen:
            seen.add(key)
            out.append(name)
    return tuple(out)


def _answer_area(claim: Claim, data: Mapping[str, Any]) -> Answer | BadAnswer:
    name = data.get("name")
    if not isinstance(name, str):
        return BadAnswer(f"`name` must be a string, got {_type_name(name)}")
    by_slug = {slug(c): c for c in area_choices(claim)}
    chosen = by_slug.get(slug(name))
    if chosen is None:
        return BadAnswer(f"`name` {name[:60]!r} is not one of the offered areas")
    description = data.get("description")
    text = " ".join(description.split())[:MAX_DESCRIPTION_CHARS] if isinstance(description, str) else ""
    return Answer(claim.type, name=chosen, description=text or None)


def _answer_severity(data: Mapping[str, Any]) -> Answer | BadAnswer:
    level = data.get("severity")
    if not isinstance(level, str):
        return BadAnswer(f"`severity` must be a string, got {_type_name(level)}")
    norm = level.strip().lower()
    if norm not in SEVERITY_LEVELS:
        return BadAnswer(f"`severity` {level[:40]!r} is not one of the ten levels")
    return Answer(TriageType.DEFINING_SEVERITY, severity=norm)


# --- results ---------------------------------------------------------------------------------


@attrs.frozen
class Entity:
    """A Wikidata item attached to a name."""

    id: str
    label: str | None = None
    description: str | None = None


def build_result(answer: Answer, ids: Mapping[str, Entity | None], *, language: str) -> Any:
    """The result the callback accepts (§6), with the Wikidata ids found (a name missing
    from `ids`, or mapped to None, goes out without one)."""
    t = answer.type
    if t is TriageType.IDENTIFYING_DATA:
        people: list[dict[str, Any]] = []
        seen_ids: set[str] = set()
        for name in answer.names:
            entity = ids.get(name)
            person: dict[str, Any] = {"name": name}
            if entity is not None and is_qid(entity.id) and entity.id not in seen_ids:
                seen_ids.add(entity.id)  # two spellings of one person: one entry
                person["wikidata"] = _entity_json(entity)
            elif entity is not None and entity.id in seen_ids:
                continue
            people.append(person)
        return {"personalities": people}
    if t is TriageType.DEFINING_TOPICS:
        return [{"name": n, "wikidataId": _qid(ids.get(n)), "language": language} for n in answer.names]
    if t is TriageType.DEFINING_IMPACT_AREA:
        assert answer.name is not None
        area: dict[str, Any] = {"name": answer.name, "wikidataId": _qid(ids.get(answer.name)), "language": language}
        if answer.description:
            area["description"] = answer.description
        return area
    return {"severity": answer.severity}


def _qid(entity: Entity | None) -> str | None:
    return entity.id if entity is not None and is_qid(entity.id) else None


def _entity_json(entity: Entity) -> dict[str, Any]:
    out: dict[str, Any] = {"id": entity.id}
    if entity.label:
        out["label"] = entity.label[:MAX_NAME_CHARS]
    if entity.description:
        out["description"] = entity.description[:MAX_DESCRIPTION_CHARS]
    return out


def lookups(answer: Answer) -> tuple[tuple[str, ...], bool]:
    """The names to look up on Wikidata and whether they must be people (P31 = Q5)."""
    if answer.type is TriageType.IDENTIFYING_DATA:
        return answer.names, True
    if answer.type is TriageType.DEFINING_TOPICS:
        return answer.names, False
    if answer.type is TriageType.DEFINING_IMPACT_AREA and answer.name is not None:
        return (answer.name,), False
    return (), False


# --- prompts ------------------------------------------------------------------------------------

LANGUAGE_NAMES = {"pt": "português do Brasil", "pt-BR": "português do Brasil", "en": "English", "es": "español"}
CLAIM_OPEN, CLAIM_CLOSE = "<claim>", "</claim>"
CONTEXT_OPEN, CONTEXT_CLOSE = "<context>", "</context>"


@attrs.frozen
class Template:
    """A prompt template: `version` (logged with each report), the system and user parts
    with `$placeholders` (`string.Template` syntax)."""

    version: str
    system: str
    user: str


class TemplateError(ValueError):
    """A template file is not in the expected shape (`version:` line, `---system`, `---user`)."""


def parse_template(source: str, *, origin: str = "template") -> Template:
    """`version: <v>` on the first non-empty line, then a `---system` and a `---user` section."""
    lines = source.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines or not lines[0].lower().startswith("version:"):
        raise TemplateError(f"{origin}: the first line must be `version: <version>`")
    version = lines[0].split(":", 1)[1].strip()
    if not version:
        raise TemplateError(f"{origin}: the version is empty")
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines[1:]:
        marker = line.strip().lower()
        if marker in ("---system", "---user"):
            current = sections.setdefault(marker[3:], [])
            continue
        if current is not None:
            current.append(line)
    if "system" not in sections or "user" not in sections:
        raise TemplateError(f"{origin}: needs a `---system` and a `---user` section")
    return Template(version, "\n".join(sections["system"]).strip(), "\n".join(sections["user"]).strip())


def fence(text: str, opening: str, closing: str) -> str:
    """Untrusted text between delimiters it cannot close early: any delimiter inside it is
    broken up, so the model sees exactly one block."""
    for tag in (opening, closing):
        text = re.sub(re.escape(tag), tag.replace("<", "< "), text, flags=re.IGNORECASE)
    return f"{opening}\n{text}\n{closing}"


def render(template: Template, claim: Claim, *, language: str) -> tuple[str, str]:
    """(system, user) messages for this claim. Placeholders: `$language`, `$language_code`,
    `$claim` (the fenced text), `$areas`, `$levels`, `$context` (severity: the fenced
    earlier results)."""
    values = {
        "language": LANGUAGE_NAMES.get(language, language),
        "language_code": language,
        "claim": fence(claim.text, CLAIM_OPEN, CLAIM_CLOSE),
        "areas": "\n".join(f"- {a}" for a in area_choices(claim)),
        "levels": ", ".join(SEVERITY_LEVELS),
        "context": fence(_context_json(claim), CONTEXT_OPEN, CONTEXT_CLOSE),
    }
    return string.Template(template.system).safe_substitute(values), string.Template(template.user).safe_substitute(values)


def _context_json(claim: Claim) -> str:
    ctx = {
        "impactArea": claim.impact_area.name if claim.impact_area else None,
        "topics": [t.name for t in claim.topics],
        "personalities": [p.name for p in claim.personalities],
    }
    return json.dumps(ctx, ensure_ascii=False)


# --- chat routing -------------------------------------------------------------------------------

_OPENAI_NAMES = re.compile(r"^(o[1-9](-[a-z0-9-]+)?|gpt-.*|chatgpt-.*|ft:gpt-.*|ft:o[1-9].*)$")
_REASONING = re.compile(r"^(o[1-9](-[a-z0-9-]+)?|gpt-5.*)$")


def is_openai_model(model: str) -> bool:
    """A name OpenAI serves (`o3`, `o4-mini`, `gpt-4o`, `gpt-5-nano`, ...)."""
    return _OPENAI_NAMES.match(model) is not None


def is_reasoning_model(model: str) -> bool:
    """o1, o3, o3-mini, o4-mini, gpt-5*: default temperature only, `max_completion_tokens`."""
    return _REASONING.match(model) is not None


def map_model(model: str, model_map: Mapping[str, str]) -> str:
    """The model to ask for `model` (MODEL_MAP), itself when not mapped."""
    return model_map.get(model, model)


class ChatRoute(enum.Enum):
    OPENAI = "openai"
    OLLAMA = "ollama"
    MOCK = "mock"


def chat_route(mode: str, model: str) -> ChatRoute:
    """Which chat backend serves `model` (already mapped) in processing mode `mode`:
    `hybrid` sends OpenAI's names to OpenAI and every other name to Ollama."""
    if mode == "mock":
        return ChatRoute.MOCK
    if mode == "openai":
        return ChatRoute.OPENAI
    if mode == "ollama":
        return ChatRoute.OLLAMA
    return ChatRoute.OPENAI if is_openai_model(model) else ChatRoute.OLLAMA


def result_fingerprint(result: Any) -> str:
    """A stable text form of a result (for logs and comparisons)."""
    return json.dumps(result, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def type_for(value: object) -> TriageType | None:
    try:
        return TriageType(value)
    except ValueError:
        return None


def names_of(items: Sequence[Named]) -> tuple[str, ...]:
    return tuple(i.name for i in items)
