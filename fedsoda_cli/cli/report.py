"""`fedsoda report RUN_DIR...`: the paper-style table and plots comparing runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedsoda_cli.cli.common import console, handles_errors
from fedsoda_cli.errors import ArtifactError


@handles_errors
def report(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="Run workdirs (e.g. runs/sst2-fedsoda runs/sst2-fedpetuning, or the runs/NAME-seed* of `fedsoda run --seeds`).",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md, report.csv and the plots.")] = Path("report"),
) -> None:
    """Compare runs: accuracy (per round, and mean ± std across seeds), communication by kind, client storage,
    step time and RSS, wall time; reductions vs fedpetuning."""
    from fedsoda_cli.compare import write_report

    for folder in run_dirs:
        if not folder.is_dir():
            raise ArtifactError(f"{folder}: not a run workdir (no such folder); pass the workdir of a run")
    written = write_report([d.resolve() for d in run_dirs], out)
    console.print(escape((out / "report.md").read_text()) if (out / "report.md").is_file() else "", highlight=False)
    console.print("wrote " + ", ".join(escape(str(p)) for p in written), highlight=False)
