"""Communication accounting: every byte that crosses between server and clients, by kind.

Kinds:
- model: the one-time download of the client model (all files of quantize/model) to each of the K
  clients, counted once per client when the run starts;
- adapter_down / adapter_up: the serialized global adapter each sampled client downloads, and the
  serialized adapter it uploads (a retried client downloads again; an excluded update was still
  uploaded, so it counts);
- realign: the serialized realigned partial layers, counted for all K clients at every realign,
  since every client holding the model must swap them in (sampled in the next round or not).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

KINDS = ("model", "adapter_down", "adapter_up", "realign")


class Ledger:
    """Byte counts in total, per client, and for the current round."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.per_client: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(KINDS, 0))
        self._round: dict[str, int] = dict.fromkeys(KINDS, 0)

    def add(self, kind: str, client: int, nbytes: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown communication kind {kind!r}")
        self.totals[kind] += nbytes
        self.per_client[client][kind] += nbytes
        self._round[kind] += nbytes

    def take_round(self) -> dict[str, int]:
        """Bytes by kind since the last call (one round's traffic), and start counting afresh."""
        taken, self._round = self._round, dict.fromkeys(KINDS, 0)
        return taken

    def state(self) -> dict[str, Any]:
        """JSON-able totals (checkpoints, summary.json)."""
        return {
            "totals": dict(self.totals),
            "total": sum(self.totals.values()),
            "per_client": {str(c): dict(v) for c, v in sorted(self.per_client.items())},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Ledger:
        ledger = cls()
        ledger.totals.update(state["totals"])
        for client, counts in state["per_client"].items():
            ledger.per_client[int(client)].update(counts)
        return ledger


def model_download_bytes(model_dir: Path) -> int:
    """Bytes a client downloads once to train: every file of the client model folder."""
    return sum(path.stat().st_size for path in Path(model_dir).rglob("*") if path.is_file())
