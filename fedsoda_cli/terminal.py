"""Terminal output: the short summary table each stage ends with, and shared progress bars."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedsoda_cli.artifacts import Manifest
from fedsoda_cli.round_record import EvalEntry


def quiet_third_party() -> None:
    """Silence library progress bars, info logs and deprecation notes: the stages show their own
    progress, and stderr stays for fedsoda's one-line errors (CI parses it)."""
    import logging
    import warnings

    import datasets
    import transformers

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward ..." on AVX512 CPUs
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes (as the workers do)
    # torch's weights-only unpickler comments on the pickle protocol of a refused .bin checkpoint;
    # the refusal itself becomes fedsoda's one-line error.
    warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def progress(console: Console) -> Progress:
    """The progress bar every long stage uses (it goes quiet when output is not a terminal)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def stage_summary(console: Console, stage: str, rows: list[tuple[str, str]], manifest: Manifest | None) -> None:
    table = Table(title=f"{stage}: done", title_justify="left", show_header=False, box=None, pad_edge=False)
    table.add_column(style="cyan")
    table.add_column()
    for key, value in rows:
        table.add_row(escape(key), escape(str(value)))  # values quote paths and names
    if manifest is not None:
        table.add_row("wall time", f"{manifest.wall_time_s:.1f} s")
        table.add_row("peak memory", f"{manifest.peak_memory_mb:.0f} MB")
    console.print(table)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def format_eval(entry: EvalEntry) -> str:
    """One per-round evaluation entry: accuracy [95 % CI], the predicted-label shares, the eval loss.
    Plain text (label words are user text): escape it before printing it as rich markup."""
    lo, hi = entry.ci95
    text = f"{100 * entry.accuracy:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"
    if entry.label_shares:
        text += " (" + ", ".join(f"{label} {100 * share:.0f} %" for label, share in entry.label_shares.items()) + ")"
    if entry.loss is not None:
        text += f", loss {entry.loss:.3f}"
    return text
