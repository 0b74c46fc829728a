"""What every command shares: the SPEC argument and options, spec loading, and error handling."""

from __future__ import annotations

import errno
import functools
import os
import re
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
            _fail("interrupted; completed stages and round checkpoints are kept: rerun to continue (fedsoda federate or run: add --resume)", 130)
        except Exception as exc:
            failed = _disk_failure(exc)
            if failed is None:
                raise
            code, filename = failed
            _fail(f"{filename or 'a file in the workdir'}: {os.strerror(code)}; free disk space (or raise the file-size limit) "
                  "or choose a writable --workdir; nothing partial was kept and earlier outputs are intact", 1)

    return wrapper


# Out of space, over quota, over the file-size limit (ulimit -f), or not allowed to write.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS)


def _disk_failure(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, filename) when `exc`, or an exception it was raised from, is a failed write to disk.

    Besides OSError, this recognises the errors of Rust-backed libraries (safetensors, tokenizers),
    which carry the OS error only in their text: "I/O error: File too large (os error 27)"."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            return exc.errno, exc.filename
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found and int(found.group(1)) in _DISK_ERRNOS:
            return int(found.group(1)), None
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _fail(message: str, code: int) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def debug_enabled() -> bool:
    return "--debug" in sys.argv
