"""`fedsoda validate SPEC`: check a spec (keys, types, ranges, plugin names) without running it."""

from __future__ import annotations

from fedsoda_cli import pipeline
from fedsoda_cli.cli.common import SetOpt, SpecArg, WorkdirOpt, console, handles_errors, open_spec
from fedsoda_cli.plugins import aggregators, pruners


@handles_errors
def validate(spec: SpecArg, set: SetOpt = None, workdir: WorkdirOpt = None) -> None:
    """Validate the spec and the plugins it names; exit 0 when it is runnable."""
    loaded, folder = open_spec(spec, set, workdir)
    pruners.get(loaded.prune.strategy)
    aggregators.create(loaded.federate.aggregator, seed=loaded.run.seed, **loaded.federate.aggregator_options)  # options too
    stages = ", ".join(s.name for s in pipeline.stages_for(loaded))
    console.print(f"[green]ok[/] {spec}: method {loaded.run.method}, stages {stages}, workdir {folder}")
