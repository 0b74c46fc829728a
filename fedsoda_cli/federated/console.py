"""What a federated run shows in the terminal: the partition table, progress, one line per round."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import TaskID
from rich.table import Table

from fedsoda_cli import terminal
from fedsoda_cli.federated.server import RoundReporter
from fedsoda_cli.round_record import RoundRecord

_MAX_ROWS = 20  # a partition table longer than this shows its head and the totals


class ConsoleReporter(RoundReporter):
    """Rich progress (round, clients done, loss) and a per-round line; exclusions name the client."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = terminal.progress(console)
        self._bar: TaskID | None = None  # set by run_started, which the round loop reports first
        self._round = 0
        self._done = 0
        self._clients = 0
        self._loss: float | None = None

    def run_started(self, first_round: int, rounds: int) -> None:
        self.progress.start()
        self._bar = self.progress.add_task("federate", total=rounds, completed=first_round - 1, status="")
        if first_round > 1:
            self.console.print(f"resuming after round {first_round - 1} of {rounds}")

    def round_started(self, round: int, clients: list[int]) -> None:
        self._round, self._done, self._clients, self._loss = round, 0, len(clients), None
        self._status()

    def client_finished(self, round: int, client: int, loss: float | None) -> None:
        self._done += 1
        self._loss = loss
        self._status()

    def client_excluded(self, round: int, client: int, reason: str) -> None:
        self._done += 1
        self.console.print(f"[yellow]round {round}: client {client} excluded: {escape(reason)}[/]", highlight=False)

    def client_failed(self, round: int, client: int, reason: str, retrying: bool) -> None:
        then = "retrying it" if retrying else "dropped from this round"
        self.console.print(f"[yellow]round {round}: client {client} failed ({escape(reason)}); {then}[/]", highlight=False)

    def realigned(self, round: int, nbytes: int) -> None:
        self.console.print(
            f"round {round}: realigned the partial layers, {terminal.format_bytes(nbytes)} to each client", highlight=False
        )

    def round_finished(self, record: RoundRecord) -> None:
        assert self._bar is not None  # run_started came first
        self.progress.advance(self._bar)
        fmt = terminal.format_bytes
        parts = [f"{len(record.updated)}/{len(record.clients)} updates"]
        left_out = {"excluded": record.excluded, "failed": record.failed}
        parts += [f"{len(problems)} {kind}" for kind, problems in left_out.items() if problems]
        parts += [f"loss {record.train_loss:.4f}", f"down {fmt(record.bytes_down)}", f"up {fmt(record.bytes_up)}"]
        if record.drift is not None:
            parts.append(f"drift {record.drift.ratio:.2f}x (threshold {record.drift.threshold:.2f}x)")
        if record.bytes_realign:
            parts.append(f"realign {fmt(record.bytes_realign)}")
        for target, entry in (record.eval or {}).items():
            parts.append(f"{target} acc {escape(terminal.format_eval(entry))}")
        self.console.print(f"round {record.round}: " + ", ".join(parts) + f", {record.seconds:.1f} s", highlight=False)

    def stop(self) -> None:
        self.progress.stop()

    def _status(self) -> None:
        loss = f", loss {self._loss:.4f}" if self._loss is not None else ""
        assert self._bar is not None  # run_started came first
        self.progress.update(self._bar, status=f"round {self._round}: clients {self._done}/{self._clients}{loss}")


def partition_table(stats: list[dict[str, Any]]) -> Table:
    """Per-client example counts and label histograms (the data each client trains on)."""
    table = Table(title="client partition", title_justify="left")
    table.add_column("client", justify="right")
    table.add_column("examples", justify="right")
    table.add_column("labels")
    for row in stats[:_MAX_ROWS]:
        hist = row["label_histogram"]
        table.add_row(str(row["client"]), str(row["size"]), ", ".join(f"{k}: {v}" for k, v in hist.items()) if hist else "-")
    if len(stats) > _MAX_ROWS:
        table.add_row("...", f"{sum(r['size'] for r in stats)} in all", f"{len(stats)} clients")
    return table
