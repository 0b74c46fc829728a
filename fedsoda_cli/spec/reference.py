"""Render the spec reference (docs/spec-reference.md) from the schema, so the docs cannot drift.

Regenerate with: python -m fedsoda_cli.spec.reference > docs/spec-reference.md
"""

from __future__ import annotations

import json
from typing import Any

from pydantic.fields import FieldInfo

from fedsoda_cli.spec.schema import SECTIONS, Spec


def render() -> str:
    lines = [
        "# Spec reference",
        "",
        "Every key of a fedsoda experiment spec (TOML), with its type, default and allowed values.",
        "Generated from `fedsoda_cli/spec/schema.py` by `python -m fedsoda_cli.spec.reference`; do not edit by hand.",
        "Any key can be overridden on the command line: `--set section.key=value` (the value is read as TOML).",
        "",
        "## Top level",
        "",
        _table({"plugins": Spec.model_fields["plugins"]}),
    ]
    for name, section in SECTIONS.items():
        doc = (section.__doc__ or "").strip()
        lines += ["", f"## [{name}]", ""]
        if doc and not doc.startswith("Usage docs"):
            lines += [doc, ""]
        lines.append(_table(section.model_fields))
    return "\n".join(lines) + "\n"


def _table(fields: dict[str, FieldInfo]) -> str:
    rows = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for key, info in fields.items():
        rows.append(f"| `{key}` | {_type(info)} | {_default(info)} | {_bounds(info)} | {info.description or ''} |")
    return "\n".join(rows)


def _type(info: FieldInfo) -> str:
    text = str(info.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return f"`{text}`".replace("|", "\\|")


def _default(info: FieldInfo) -> str:
    value: Any = info.get_default(call_default_factory=True)
    return f"`{json.dumps(value)}`".replace("|", "\\|")


def _bounds(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                parts.append(f"{symbol} {getattr(meta, attr)}")
    return ", ".join(parts)


if __name__ == "__main__":
    print(render(), end="")
