"""`fedsoda run SPEC`: every stage in order, skipping those already up to date (like make)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from fedsoda_cli import artifacts, pipeline
from fedsoda_cli.cli.common import SetOpt, SpecArg, WorkdirOpt, console, handles_errors, open_spec
from fedsoda_cli.cli.federate import ResumeOpt
from fedsoda_cli.errors import ArtifactError, SpecError


@handles_errors
def run(
    spec: SpecArg,
    set: SetOpt = None,
    workdir: WorkdirOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun stages even when up to date.")] = False,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="First stage to run.")] = None,
    to_stage: Annotated[Optional[str], typer.Option("--to", help="Last stage to run.")] = None,
    resume: ResumeOpt = False,
) -> None:
    """Run the pipeline end to end (or the range --from..--to)."""
    loaded, folder = open_spec(spec, set, workdir)
    stages = _select(pipeline.stages_for(loaded), from_stage, to_stage)
    console.print(f"[bold]fedsoda run[/] {loaded.run.name} ({loaded.run.method}) -> {folder}")
    for stage in stages:
        state = {s.stage: s for s in pipeline.status(loaded, folder)}[stage.name]
        if state.state == "done" and not force:
            damage = _damage(folder, stage.name)
            if damage is None:
                console.print(f"[green]{stage.name}[/]: up to date, skipped")
                continue
            console.print(f"[yellow]{stage.name}[/]: outputs modified or corrupt ({damage}), rerunning", highlight=False)
        if state.state == "stale":
            console.print(f"[yellow]{stage.name}[/]: stale ({state.reason}), rerunning")
        options = {"resume": resume} if stage.name == "federate" else {}
        pipeline.execute(loaded, folder, stage, console, **options)


def _damage(workdir, stage: str) -> str | None:
    """Why a done stage's files no longer match its manifest (a file changed, truncated or gone), or None.
    Status compares only hashes of specs and inputs; before skipping a stage, its outputs are hashed too."""
    try:
        artifacts.verify(workdir, artifacts.read_manifest(workdir, stage))
    except ArtifactError as exc:
        return str(exc).split(";")[0]
    return None


def _select(stages, first: str | None, last: str | None):
    names = [s.name for s in stages]
    for option, value in (("--from", first), ("--to", last)):
        if value is not None and value not in names:
            raise SpecError(f"{option} {value!r}: not a stage of this method; choose one of {', '.join(names)}")
    start = names.index(first) if first else 0
    end = names.index(last) if last else len(names) - 1
    if start > end:
        raise SpecError(f"--from {first} comes after --to {last}; the order is {', '.join(names)}")
    return stages[start : end + 1]
