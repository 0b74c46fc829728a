"""`fedsoda federate SPEC [--resume]`: one server and K clients for R rounds on the client model."""

from __future__ import annotations

from typing import Annotated

import typer

from fedsoda_cli import artifacts, pipeline
from fedsoda_cli.cli.common import SetOpt, SpecArg, WorkdirOpt, console, handles_errors, open_spec

ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue after the last complete round (checkpoints in <workdir>/federate.checkpoints).")
]


@handles_errors
def federate(spec: SpecArg, set: SetOpt = None, workdir: WorkdirOpt = None, resume: ResumeOpt = False) -> None:
    """Federated LoRA fine-tuning with client workers as processes; realigns every r rounds."""
    loaded, folder = open_spec(spec, set, workdir)
    with artifacts.workdir_lock(folder):
        pipeline.execute(loaded, folder, pipeline.stage_named(loaded, "federate"), console, resume=resume)
