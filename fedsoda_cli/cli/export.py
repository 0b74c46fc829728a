"""`fedsoda export SPEC`: the full LLM with the global adapter merged, as a Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedsoda_cli import artifacts
from fedsoda_cli.cli.common import SetOpt, SpecArg, WorkdirOpt, console, handles_errors, open_spec


@handles_errors
def export(
    spec: SpecArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for the merged checkpoint.")],
    set: SetOpt = None,
    workdir: WorkdirOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or bfloat16.")] = "bfloat16",
) -> None:
    """Write the full model with the adapter merged, loadable by any transformers-based tool."""
    from fedsoda_cli.errors import SpecError
    from fedsoda_cli.export import export_merged

    if dtype not in ("float32", "bfloat16"):
        raise SpecError(f"--dtype {dtype!r}: choose float32 or bfloat16")
    loaded, folder = open_spec(spec, set, workdir)
    with artifacts.workdir_lock(folder):  # a run replacing federate/ mid-merge would mix two results
        path = export_merged(loaded, folder, out, dtype=dtype)
    console.print(f"[green]exported[/] {escape(str(path))}", highlight=False)
