"""Prompt templates of the triage types: shipped in the package, overridable from a folder.

`load_templates(prompts_dir)` reads `<type>.txt` for each type from `PROMPTS_DIR` when the
file is there, else the copy shipped in `processor/kinds/prompts/`. A file in the wrong
shape is a start-up error naming the file (`TemplateError`), never a silent default.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from processor.pure.triage import Template, TemplateError, TriageType, parse_template

__all__ = ["TemplateError", "load_template", "load_templates", "packaged_source"]


def packaged_source(name: str) -> str:
    return (resources.files("processor") / "kinds" / "prompts" / f"{name}.txt").read_text(encoding="utf-8")


def load_template(name: str, prompts_dir: str | None = None) -> tuple[Template, str]:
    """The template `name` and where it came from (a path, or `package`)."""
    if prompts_dir:
        path = Path(prompts_dir) / f"{name}.txt"
        if path.is_file():
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TemplateError(f"{path}: unreadable ({exc})") from None
            return parse_template(source, origin=str(path)), str(path)
    return parse_template(packaged_source(name), origin=f"package:{name}.txt"), "package"


def load_templates(prompts_dir: str | None = None) -> dict[TriageType, Template]:
    return {t: load_template(t.value, prompts_dir)[0] for t in TriageType}
