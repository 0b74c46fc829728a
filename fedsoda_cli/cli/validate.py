"""`fedsoda validate SPEC`: check a spec (keys, types, ranges, plugin names) without running it."""

from __future__ import annotations

from rich.markup import escape

from fedsoda_cli import pipeline
from fedsoda_cli.cli.common import SetOpt, SpecArg, WorkdirOpt, console, handles_errors, open_spec
from fedsoda_cli.errors import SpecError
from fedsoda_cli.models.load import model_depth
from fedsoda_cli.plugins import aggregators, pruners
from fedsoda_cli.plugins.pruners import check_request


@handles_errors
def validate(spec: SpecArg, set: SetOpt = None, workdir: WorkdirOpt = None) -> None:
    """Validate the spec and the plugins it names; exit 0 when it is runnable."""
    loaded, folder = open_spec(spec, set, workdir)
    pruners.get(loaded.prune.strategy)
    _check_model(loaded)
    aggregators.create(loaded.federate.aggregator, seed=loaded.run.seed, **loaded.federate.aggregator_options)  # options too
    stages = ", ".join(s.name for s in pipeline.stages_for(loaded))
    console.print(
        f"[green]ok[/] {escape(str(spec))}: method {loaded.run.method}, stages {stages}, workdir {escape(str(folder))}",
        highlight=False,
    )


def _check_model(spec) -> None:
    """What the model's depth decides, read from its config alone (no weights), so that a request
    the model cannot satisfy fails here rather than after profile has run."""
    depth = model_depth(spec.model)
    if depth is None:
        return
    if "prune" in {s.name for s in pipeline.stages_for(spec)}:
        check_request(depth, spec.prune)
    if spec.lora.layers and max(spec.lora.layers) >= depth:
        raise SpecError(
            f"lora.layers holds {max(spec.lora.layers)}, but the model has {depth} layers (0 to {depth - 1}); "
            "fix lora.layers or omit it for every layer"
        )
