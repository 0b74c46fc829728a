"""docs/reliability.md stays true: every test it cites exists, and every reliability test is cited."""

from __future__ import annotations

import ast
import re

from .conftest import REPO

DOC = REPO / "docs" / "reliability.md"


def functions_in(path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def cited() -> set[tuple[str, str]]:
    return set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)", DOC.read_text()))


def test_every_cited_test_exists():
    missing = [
        f"{path}::{name}"
        for path, name in sorted(cited())
        if not (REPO / path).is_file() or name not in functions_in(REPO / path)
    ]
    assert not missing, missing


def test_every_reliability_test_is_cited():
    refs = cited()
    folder = REPO / "tests" / "reliability"
    uncited = [
        f"{path.name}::{name}"
        for path in sorted(folder.glob("test_*.py"))
        if path.name != "test_reliability_doc.py"
        for name in sorted(functions_in(path))
        if (f"tests/reliability/{path.name}", name) not in refs
    ]
    assert not uncited, uncited
