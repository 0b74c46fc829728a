"""The dependency rule of docs/architecture.md, checked on the source: every module of fedsoda_cli
belongs to one layer and imports only from its own layer or a lower one, and no modules import
each other in a circle. Imports are read with `ast`, top-level and function-local alike, because
a lazy import inside a function is still an arrow: it only changes when the circle bites."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fedsoda_cli"

# Top to bottom; a module belongs to the first layer with a prefix it matches (a whole dotted
# component: "fedsoda_cli.data" does not match "fedsoda_cli.database"). Keep in step with the
# table in docs/architecture.md.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("fedsoda_cli.cli", "fedsoda_cli.__main__")),
    ("orchestrator", ("fedsoda_cli.pipeline", "fedsoda_cli.export", "fedsoda_cli.compare")),
    ("stages", ("fedsoda_cli.stages", "fedsoda_cli.baselines")),
    ("method libraries and runtime", ("fedsoda_cli.sgp", "fedsoda_cli.oda", "fedsoda_cli.federated", "fedsoda_cli.evaluation")),
    (
        "building blocks",
        (
            "fedsoda_cli.models",
            "fedsoda_cli.data",
            "fedsoda_cli.plugins",
            "fedsoda_cli.round_record",
            "fedsoda_cli.artifacts",
            "fedsoda_cli.terminal",
        ),
    ),
    ("leaves", ("fedsoda_cli.spec", "fedsoda_cli.errors", "fedsoda_cli.seeding", "fedsoda_cli")),
]


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that `name` imports anywhere in its file. `from a import b` is an arrow
    to module a.b when that is a module, else to a; anything outside the package is ignored."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:  # an attribute path: fall back to the module that holds it
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = module_files(root)
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def layer_of(module: str, layers=LAYERS) -> int:
    for index, (_, prefixes) in enumerate(layers):
        # the bare package matches only itself, or every unlisted module would fall into it
        if any(module == p or (p != "fedsoda_cli" and module.startswith(p + ".")) for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add its folder to LAYERS here and to docs/architecture.md")


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    return sorted(
        f"{a} ({layers[layer_of(a, layers)][0]}) imports {b} ({layers[layer_of(b, layers)][0]})"
        for a, targets in graph.items()
        for b in targets
        if layer_of(b, layers) < layer_of(a, layers)
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # the package has ~120 modules, well inside the recursion limit
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_belongs_to_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_checks_catch_an_upward_arrow_and_a_circle(tmp_path):
    """The detector itself, on a made-up package: a stage importing the orchestrator, and two
    library modules importing each other (one of them lazily, inside a function)."""
    package = tmp_path / "fedsoda_cli"
    (package / "stages").mkdir(parents=True)
    (package / "oda").mkdir()
    for init in (package, package / "stages", package / "oda"):
        (init / "__init__.py").write_text("")
    (package / "pipeline.py").write_text("from fedsoda_cli.stages import align\n")
    (package / "stages" / "align.py").write_text("from fedsoda_cli.pipeline import execute\nfrom ..oda import distill\n")
    (package / "oda" / "distill.py").write_text("def f():\n    from fedsoda_cli.oda.realign import g\n")
    (package / "oda" / "realign.py").write_text("from . import distill\n")
    graph = import_graph(package)
    assert graph["fedsoda_cli.stages.align"] == {"fedsoda_cli.pipeline", "fedsoda_cli.oda.distill"}
    assert upward_imports(graph) == ["fedsoda_cli.stages.align (stages) imports fedsoda_cli.pipeline (orchestrator)"]
    assert sorted(cycles(graph)) == [
        ["fedsoda_cli.oda.distill", "fedsoda_cli.oda.realign"],
        ["fedsoda_cli.pipeline", "fedsoda_cli.stages.align"],
    ]


def test_architecture_doc_lists_every_layer_folder():
    """docs/architecture.md and LAYERS name the same folders and modules."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for _, prefixes in LAYERS:
        for prefix in prefixes:
            if prefix == "fedsoda_cli":
                continue
            short = prefix.removeprefix("fedsoda_cli.")
            assert f"`{short}" in doc, f"docs/architecture.md does not name `{short}`"


def test_the_orchestrator_names_only_stages():
    """Every stage of every method, and the standalone realign stage, points into the stages layer."""
    from typing import get_args

    from fedsoda_cli import pipeline
    from fedsoda_cli.spec.schema import RunSpec

    methods = get_args(RunSpec.model_fields["method"].annotation)
    assert set(methods) == set(pipeline.PIPELINES)
    for stage in [*(s for stages in pipeline.PIPELINES.values() for s in stages), pipeline.REALIGN]:
        module, _, function = stage.entry.partition(":")
        assert LAYERS[layer_of(module)][0] == "stages", stage
        assert callable(getattr(importlib.import_module(module), function)), stage


@pytest.mark.parametrize("module", ["fedsoda_cli.stages.contract"])
def test_the_stage_contract_imports_nothing_above_the_building_blocks(module):
    graph = import_graph()
    assert all(layer_of(target) >= layer_of("fedsoda_cli.models") for target in graph[module]), graph[module]
