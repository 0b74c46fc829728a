"""What every command shares: the SPEC argument and options, spec loading, and error handling."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedsoda_cli.errors import FedsodaError
from fedsoda_cli.plugins import load_plugin_files
from fedsoda_cli.spec import Spec, load_spec, resolve_workdir, spec_dir

console = Console(stderr=False)
err_console = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="The TOML experiment spec.", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a spec key: --set federate.rounds=3 (repeatable).")]
WorkdirOpt = Annotated[Path | None, typer.Option("--workdir", help="Artifact folder (default: run.workdir of the spec).")]


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
            with _sigterm_interrupts():
                return command(*args, **kwargs)
        except FedsodaError as exc:
            _fail(str(exc), exc.exit_code)
        except Terminated:
            _fail(f"terminated (SIGTERM); {_KEPT}", SIGTERM_EXIT)
        except KeyboardInterrupt:
            _fail(f"interrupted; {_KEPT}", 130)
        except Exception as exc:
            bad_path = _bad_path(exc)
            if bad_path is not None:
                _fail(bad_path, 2)
            failed = _disk_failure(exc)
            if failed is None:
                raise
            code, filename = failed
            _fail(
                f"{filename or 'a file in the workdir'}: {os.strerror(code)}; free disk space (or raise the file-size limit) "
                "or choose a writable --workdir; nothing partial was kept and earlier outputs are intact",
                1,
            )

    return wrapper


_KEPT = "completed stages and round checkpoints are kept: rerun to continue (fedsoda federate or run: add --resume)"
SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that it unwinds like Ctrl-C: every `finally`
    runs (workers are stopped, scratch folders removed, the workdir lock released)."""


@contextlib.contextmanager
def _sigterm_interrupts():
    # A CI job's timeout or `kill` sends SIGTERM to the main process only; by default it would die
    # at once, silently, leaving the workers to PR_SET_PDEATHSIG and the scratch folders behind.
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Out of space, over quota, over the file-size limit (ulimit -f), or not allowed to write.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS)


def _bad_path(exc: BaseException) -> str | None:
    """The message for a path the OS cannot take (a NUL byte, a name or path over the system's
    limit), wherever it was given: the spec, --set or an option."""
    if isinstance(exc, ValueError) and "null byte" in str(exc):
        return "a path given in the spec or on the command line contains a NUL character; remove it"
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        shown = str(exc.filename or "a path")
        shown = shown if len(shown) <= 80 else f"{shown[:60]}...({len(shown)} characters)"
        return f"{shown}: file name too long for this system; use a shorter path or name"
    return None


def _disk_failure(exc: BaseException | None) -> tuple[int, str | None] | None:
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
    # The message quotes user input (names, paths, values): shown as written, never read as markup.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
