"""Run the federate stage of a spec in this process, as `fedsoda federate SPEC [--resume]` will.

Used by the SIGKILL test, which needs a real separate process to kill:
    python -m tests.federated.run_federate SPEC [--resume] [--set key=value ...]
"""

from __future__ import annotations

import sys

from rich.console import Console

from fedsoda_cli import pipeline
from fedsoda_cli.plugins import load_plugin_files
from fedsoda_cli.spec import load_spec, resolve_workdir, spec_dir


def main(argv: list[str]) -> None:
    path, rest = argv[0], argv[1:]
    overrides = [rest[i + 1] for i, arg in enumerate(rest) if arg == "--set"]
    spec = load_spec(path, overrides)
    load_plugin_files(spec.plugins, spec_dir(spec))
    pipeline.execute(spec, resolve_workdir(spec), pipeline.stage_named(spec, "federate"), Console(), resume="--resume" in rest)


if __name__ == "__main__":
    main(sys.argv[1:])
