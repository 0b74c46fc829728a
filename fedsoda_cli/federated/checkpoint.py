"""Round checkpoints: everything needed to continue a run after its last complete round.

A checkpoint folder `round-NNNN/` holds
  adapter/                         the global adapter in PEFT format (PeftModel.from_pretrained)
  aggregator.safetensors|.json     the aggregator's state_dict (tensors | JSON values)
  realign/layers.safetensors       the latest realigned partial layers as sent to clients (if any)
  realign/state.safetensors|.json  the realigner's state_dict
  rng.safetensors                  torch's global RNG state
  state.json                       round, identity (spec hash, input digest), metrics so far,
                                   communication totals, python/numpy RNG states
It is written into a temporary folder and renamed into place, so a run killed at any moment
leaves only complete checkpoints. Client training never draws from a global RNG stream (every
seed derives from (run.seed, round, client)); the RNG states are kept for aggregator plugins.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsoda_cli.errors import ArtifactError, PluginError

if TYPE_CHECKING:
    from peft import LoraConfig

    from fedsoda_cli.plugins.contracts import AdapterState

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class Checkpoint:
    """The server's state after round `round`."""

    round: int
    adapter: "AdapterState"
    aggregator_state: dict[str, Any] = field(default_factory=dict)
    realign_layers: bytes | None = None
    realigner_state: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl lines so far
    ledger: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)


class CheckpointStore:
    """Checkpoints of one run in `folder`, tagged with `identity` (spec hash, input digest)."""

    def __init__(self, folder: Path, identity: dict[str, str], lora: "LoraConfig", keep: int = 2):
        self.folder, self.identity, self.lora, self.keep = Path(folder), identity, lora, keep

    def save(self, checkpoint: Checkpoint, aggregator: str) -> Path:
        """Write `checkpoint` atomically as round-NNNN/; keep only the newest `keep` ones."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"round-{checkpoint.round:04d}"
        tmp = self.folder / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            write_peft_adapter(tmp / "adapter", checkpoint.adapter, self.lora)
            write_state(tmp, "aggregator", checkpoint.aggregator_state, f"aggregator '{aggregator}' state_dict()")
            if checkpoint.realign_layers is not None:
                (tmp / "realign").mkdir()
                (tmp / "realign" / "layers.safetensors").write_bytes(checkpoint.realign_layers)
                write_state(tmp / "realign", "state", checkpoint.realigner_state, "realigner state_dict()")
            self._write_state(tmp, checkpoint)
            _fsync_tree(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._prune()
        return target

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None; an ArtifactError if it belongs to another run."""
        rounds = self._rounds()
        if not rounds:
            return None
        folder = rounds[-1]
        state = json.loads((folder / "state.json").read_text())
        if state["identity"] != self.identity:
            raise ArtifactError(f"checkpoint {folder} came from a different spec or quantize output "
                               f"(spec hash {state['identity'].get('spec_hash')} vs {self.identity.get('spec_hash')}, "
                               f"input {state['identity'].get('quantize')} vs {self.identity.get('quantize')}); rerun without --resume to start over")
        return _read(folder, state)

    def clear(self) -> int:
        """Delete every checkpoint (a fresh run); returns how many there were."""
        count = len(self._rounds())
        shutil.rmtree(self.folder, ignore_errors=True)
        return count

    def _rounds(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob("round-*") if (p / "state.json").is_file())

    def _prune(self) -> None:
        for old in self._rounds()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.folder.glob(".round-*.tmp"):  # left by a run killed mid-write
            shutil.rmtree(stale, ignore_errors=True)

    def _write_state(self, folder: Path, checkpoint: Checkpoint) -> None:
        """state.json (written last: its presence marks a complete checkpoint) and rng.safetensors."""
        from safetensors.torch import save_file

        rng = dict(checkpoint.rng)
        torch_state = rng.pop("torch", None)
        if torch_state is not None:
            save_file({"torch": torch_state}, folder / "rng.safetensors")
        state = {"round": checkpoint.round, "identity": self.identity, "history": checkpoint.history,
                 "ledger": checkpoint.ledger, "rng": rng}
        (folder / "state.json").write_text(json.dumps(state, sort_keys=True))


def write_peft_adapter(folder: Path, adapter: "AdapterState", lora: "LoraConfig") -> Path:
    """An adapter folder that `PeftModel.from_pretrained(sub_llm, folder)` loads."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.items()}, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    lora.save_pretrained(folder)
    return folder


def read_peft_adapter(folder: Path) -> "AdapterState":
    from safetensors.torch import load_file

    return load_file(folder / ADAPTER_WEIGHTS)


def write_state(folder: Path, stem: str, state: dict[str, Any], owner: str) -> None:
    """A flat state dict as `<stem>.safetensors` (tensor values) + `<stem>.json` (the rest)."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    try:
        text = json.dumps(values, sort_keys=True)
    except TypeError as exc:
        raise PluginError(f"{owner} must hold only tensors and JSON values at the top level ({exc}); fix the plugin") from None
    save_file(tensors, folder / f"{stem}.safetensors")
    (folder / f"{stem}.json").write_text(text)


def read_state(folder: Path, stem: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = folder / f"{stem}.json"
    if not path.is_file():
        return {}
    return {**json.loads(path.read_text()), **load_file(folder / f"{stem}.safetensors")}


def capture_rng() -> dict[str, Any]:
    """The global python/numpy/torch RNG states (torch's as a tensor)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    legacy = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [legacy[0], legacy[1].tolist(), *legacy[2:]],
            "torch": torch.get_rng_state()}


def restore_rng(rng: dict[str, Any]) -> None:
    import numpy as np
    import torch

    if not rng:
        return
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(rng["torch"])


def _read(folder: Path, state: dict[str, Any]) -> Checkpoint:
    from safetensors.torch import load_file

    rng = dict(state.get("rng") or {})
    if (folder / "rng.safetensors").is_file():
        rng["torch"] = load_file(folder / "rng.safetensors")["torch"]
    layers = folder / "realign" / "layers.safetensors"
    return Checkpoint(
        round=int(state["round"]),
        adapter=read_peft_adapter(folder / "adapter"),
        aggregator_state=read_state(folder, "aggregator"),
        realign_layers=layers.read_bytes() if layers.is_file() else None,
        realigner_state=read_state(folder / "realign", "state") if layers.is_file() else {},
        history=state["history"],
        ledger=state["ledger"],
        rng=rng,
    )


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
