"""The tables docs/architecture.md quotes from the code are the code's own.

Run `python tests/test_docs.py` to write them again after changing a table."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from processor.pure import lifecycle, policy

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def _table(header: list[str], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(f"`{c}`" if c != "—" else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rendered() -> dict[str, str]:
    return {
        "lifecycle-table": _table(["phase", "event", "new phase", "effects"], lifecycle.table_rows()),
        "policy-table": _table(["dependency", "fault", "action", "then", "breaker"], policy.table_rows()),
    }


def _replace(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name} -->\n).*?(<!-- /{name} -->)", re.S)
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def test_quoted_tables_match_the_code() -> None:
    text = DOC.read_text()
    for name, body in rendered().items():
        assert f"<!-- {name} -->\n{body}\n<!-- /{name} -->" in text, f"{name} is stale: run python tests/test_docs.py"


if __name__ == "__main__":
    text = DOC.read_text()
    for name, body in rendered().items():
        text = _replace(text, name, body)
    DOC.write_text(text)
    sys.exit(0)
