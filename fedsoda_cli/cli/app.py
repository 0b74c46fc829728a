"""The `fedsoda` command: one Typer app, one module per command."""

from __future__ import annotations

import sys

import typer

from fedsoda_cli.cli import export, federate, realign, report, stages, status, validate
from fedsoda_cli.cli import run as run_module

app = typer.Typer(
    name="fedsoda",
    help="Federated fine-tuning of LLMs with FedSODA: similarity group pruning, orchestrated distillation alignment and QLoRA.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

for _name in ("profile", "prune", "align", "quantize"):
    app.command(_name)(stages.stage_command(_name))
app.command("federate")(federate.federate)
app.command("realign")(realign.realign)
app.command("eval")(stages.stage_command("eval"))
app.command("run")(run_module.run)
app.command("status")(status.status)
app.command("validate")(validate.validate)
app.command("report")(report.report)
app.command("export")(export.export)


def main() -> None:
    try:
        app()
    except ValueError as exc:
        # click checks Path arguments with os.stat before any command (and its error handling) runs.
        if "null byte" not in str(exc) or "--debug" in sys.argv:
            raise
        print("error: a path given on the command line contains a NUL character; remove it", file=sys.stderr)
        sys.exit(2)
