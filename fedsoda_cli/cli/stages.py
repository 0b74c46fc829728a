"""One command per pipeline stage: `fedsoda profile SPEC`, `fedsoda prune SPEC`, ...

Each reruns its stage from the artifacts of the stage before, whatever its status.
"""

from __future__ import annotations

from collections.abc import Callable

from fedsoda_cli import artifacts, pipeline
from fedsoda_cli.cli.common import SetOpt, SpecArg, WorkdirOpt, console, handles_errors, open_spec

HELP = {
    "profile": "Measure angular distances between layer inputs of the full LLM on public data.",
    "prune": "Similarity group pruning: remove p groups of n redundant layers to get the sub-LLM.",
    "align": "ODA pre-alignment: distil the sub-LLM's partial layers toward the full LLM.",
    "quantize": "Quantize the aligned sub-LLM to NF4 (QLoRA base) for the clients.",
    "eval": "Evaluate the plugin, sub and zero-shot targets on the task and held-out text.",
}


def stage_command(name: str) -> Callable:
    @handles_errors
    def command(spec: SpecArg, set: SetOpt = None, workdir: WorkdirOpt = None) -> None:
        loaded, folder = open_spec(spec, set, workdir)
        with artifacts.workdir_lock(folder):
            pipeline.execute(loaded, folder, pipeline.stage_named(loaded, name), console)

    command.__name__ = name
    command.__doc__ = HELP[name]
    return command
