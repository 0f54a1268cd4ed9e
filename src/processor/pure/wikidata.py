"""Wikidata's answers (CONTRACT.md §8) read into plain values, and the choice of a match.

Pure: the adapter (`processor.effects.wikidata`) makes the requests, this module builds
their parameters, reads their bodies (never raising on a strange one) and decides which
candidate a name gets: for a person the best-ranked search result that is an instance of
(`P31`) human (`Q5`); for a topic or an area the best-ranked result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from processor.pure.triage import Entity, is_qid

MAX_IDS_PER_REQUEST = 50
SEARCH_LIMIT = 5
MAXLAG = 5
HUMAN = "Q5"


@attrs.frozen
class Facts:
    """What `wbgetentities` says about one item."""

    id: str
    human: bool
    label: str | None = None
    description: str | None = None


class Unreadable(ValueError):
    """A 200 whose body is not what §8 describes."""


def normalise(name: str) -> str:
    """The cache key of a name: whitespace collapsed, case folded."""
    return " ".join(name.split()).casefold()


def search_params(name: str, language: str) -> dict[str, str]:
    lang = language.split("-")[0]
    return {
        "action": "wbsearchentities", "search": name, "language": lang, "uselang": lang, "type": "item",
        "limit": str(SEARCH_LIMIT), "format": "json", "maxlag": str(MAXLAG),
    }


def entities_params(ids: Sequence[str], language: str) -> dict[str, str]:
    if not 0 < len(ids) <= MAX_IDS_PER_REQUEST:
        raise ValueError(f"wbgetentities takes 1..{MAX_IDS_PER_REQUEST} ids")
    lang = language.split("-")[0]
    return {
        "action": "wbgetentities", "ids": "|".join(ids), "props": "labels|descriptions|claims",
        "languages": f"{lang}|en", "format": "json", "maxlag": str(MAXLAG),
    }


def chunks(ids: Iterable[str], size: int = MAX_IDS_PER_REQUEST) -> list[list[str]]:
    """Distinct ids, in first-seen order, in groups of at most `size`."""
    unique = list(dict.fromkeys(ids))
    return [unique[i : i + size] for i in range(0, len(unique), size)]


def error_code(body: Any) -> str | None:
    """The `error.code` of an API error body (`maxlag`, `ratelimited`, ...), else None."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code")
        return code if isinstance(code, str) else "unknown"
    return None


def parse_search(body: Any) -> list[Entity]:
    """The candidates of a `wbsearchentities` answer, best first (entries without a valid
    id are skipped). Raises Unreadable when the body has no `search` list."""
    if not isinstance(body, dict) or not isinstance(body.get("search"), list):
        raise Unreadable("wbsearchentities answer has no `search` list")
    out = []
    for item in body["search"]:
        if not isinstance(item, dict) or not is_qid(item.get("id")):
            continue
        label, description = item.get("label"), item.get("description")
        out.append(Entity(item["id"], label if isinstance(label, str) else None,
                          description if isinstance(description, str) else None))
    return out


def _text(values: Any, language: str) -> str | None:
    if not isinstance(values, dict):
        return None
    for lang in (language.split("-")[0], "en"):
        entry = values.get(lang)
        if isinstance(entry, dict) and isinstance(entry.get("value"), str):
            return str(entry["value"])
    return None


def _instance_of(claims: Any) -> set[str]:
    out: set[str] = set()
    if not isinstance(claims, dict) or not isinstance(claims.get("P31"), list):
        return out
    for statement in claims["P31"]:
        try:
            value = statement["mainsnak"]["datavalue"]["value"]["id"]
        except (KeyError, TypeError):
            continue
        if isinstance(value, str):
            out.add(value)
    return out


def parse_entities(body: Any, language: str) -> dict[str, Facts]:
    """The facts of a `wbgetentities` answer by id (missing items are left out). Raises
    Unreadable when the body has no `entities` object."""
    if not isinstance(body, dict) or not isinstance(body.get("entities"), dict):
        raise Unreadable("wbgetentities answer has no `entities` object")
    out = {}
    for qid, entity in body["entities"].items():
        if not is_qid(qid) or not isinstance(entity, dict) or "missing" in entity:
            continue
        out[qid] = Facts(qid, HUMAN in _instance_of(entity.get("claims")),
                         _text(entity.get("labels"), language), _text(entity.get("descriptions"), language))
    return out


def best_match(candidates: Sequence[Entity], facts: Mapping[str, Facts] | None) -> Entity | None:
    """The best-ranked candidate; for people (`facts` given) the best-ranked human, with
    the label and description Wikidata gives for it."""
    if facts is None:
        return candidates[0] if candidates else None
    for c in candidates:
        f = facts.get(c.id)
        if f is not None and f.human:
            return Entity(c.id, f.label or c.label, f.description or c.description)
    return None


def entity_to_json(e: Entity) -> list[Any]:
    return [e.id, e.label, e.description]


def entity_from_json(value: Any) -> Entity | None:
    if isinstance(value, list) and len(value) == 3 and is_qid(value[0]):
        label, description = value[1], value[2]
        return Entity(value[0], label if isinstance(label, str) else None, description if isinstance(description, str) else None)
    return None
