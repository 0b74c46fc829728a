"""`fedsoda realign SPEC --adapter DIR`: ODA intermittent realignment, run standalone on the server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedsoda_cli import artifacts, pipeline
from fedsoda_cli.cli.common import SetOpt, SpecArg, WorkdirOpt, console, handles_errors, open_spec
from fedsoda_cli.errors import ArtifactError


@handles_errors
def realign(
    spec: SpecArg,
    adapter: Annotated[
        Path, typer.Option("--adapter", help="A PEFT adapter folder of the sub-LLM, e.g. <workdir>/federate/adapter.")
    ],
    set: SetOpt = None,
    workdir: WorkdirOpt = None,
) -> None:
    """Realign the partial layers with a global adapter attached; writes a new client model to <workdir>/realign/."""
    if not (adapter / "adapter_config.json").is_file():
        raise ArtifactError(
            f"{adapter}: not a PEFT adapter folder (no adapter_config.json); pass e.g. <workdir>/federate/adapter"
        )
    loaded, folder = open_spec(spec, set, workdir)
    with artifacts.workdir_lock(folder):
        pipeline.execute(loaded, folder, pipeline.REALIGN, console, adapter=adapter)
