"""`fedsoda status SPEC`: which stages are done, stale or missing."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fedsoda_cli import pipeline
from fedsoda_cli.cli.common import SetOpt, SpecArg, WorkdirOpt, console, handles_errors, open_spec

_STYLE = {"done": "green", "stale": "yellow", "missing": "red"}


@handles_errors
def status(
    spec: SpecArg,
    set: SetOpt = None,
    workdir: WorkdirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Show each stage as done / stale / missing."""
    loaded, folder = open_spec(spec, set, workdir)
    states = pipeline.status(loaded, folder)
    if as_json:
        print(json.dumps([s.__dict__ for s in states], indent=2))
        return
    table = Table(title=escape(f"{loaded.run.name}: {folder}"), title_justify="left")
    for column in ("stage", "state", "reason"):
        table.add_column(column)
    for s in states:
        table.add_row(s.stage, f"[{_STYLE[s.state]}]{s.state}[/]", escape(s.reason))
    console.print(table)
