"""What every command shares: the SPEC argument and options, spec loading, and error handling."""

from __future__ import annotations

import errno
import functools
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console

from fedsoda_cli.errors import FedsodaError
from fedsoda_cli.plugins import load_plugin_files
from fedsoda_cli.spec import Spec, load_spec, resolve_workdir, spec_dir

console = Console(stderr=False)
err_console = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="The TOML experiment spec.", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a spec key: --set federate.rounds=3 (repeatable).")]
WorkdirOpt = Annotated[Optional[Path], typer.Option("--workdir", help="Artifact folder (default: run.workdir of the spec).")]


def open_spec(path: Path, overrides: list[str] | None, workdir: Path | None) -> tuple[Spec, Path]:
    """Load and validate the spec, import the plugin files it lists, and resolve the workdir."""
    spec = load_spec(path, overrides or [])
    load_plugin_files(spec.plugins, spec_dir(spec))
    return spec, resolve_workdir(spec, workdir)


def handles_errors(command: Callable) -> Callable:
    """Turn a FedsodaError (or a disk/permission problem) into one line on stderr and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FedsodaError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; completed stages and checkpoints are kept, rerun to continue", 130)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
                _fail(f"{exc.filename or 'workdir'}: {exc.strerror}; free space or choose a writable --workdir (nothing partial was kept)", 1)
            raise

    return wrapper


def _fail(message: str, code: int) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def debug_enabled() -> bool:
    return "--debug" in sys.argv
