"""Round checkpoints: everything needed to continue a run after its last complete round.

A checkpoint folder `round-NNNN/` holds
  adapter/                         the global adapter in PEFT format (PeftModel.from_pretrained)
  aggregator.safetensors|.json     the aggregator's state_dict (tensors | JSON values)
  realign/layers.safetensors       the latest realigned partial layers as sent to clients (if any)
  realign/state.safetensors|.json  the realigner's state_dict
  rng.safetensors                  torch's global RNG state
  state.json                       round, identity (spec hash, input digest), round records so far,
                                   communication totals, python/numpy RNG states, the sha256 of
                                   every other file and of its own content
It is written into a temporary folder and swapped into place by `artifacts.replace_folder`, so a
run killed at any moment leaves only complete checkpoints (a round being replaced is put back by the
next save or resume if the kill fell between the swap's two renames). A resume verifies every hash first: a checkpoint changed on disk
would otherwise continue into a different result with exit 0. Client training never draws from a
global RNG stream (every seed derives from (run.seed, round, client)); the RNG states are kept for
aggregator plugins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsoda_cli.artifacts import recover_folder, replace_folder, sha256_file
from fedsoda_cli.errors import ArtifactError, PluginError
from fedsoda_cli.round_record import RoundRecord

if TYPE_CHECKING:
    from peft import LoraConfig

    from fedsoda_cli.plugins.contracts import AdapterState

ADAPTER_WEIGHTS = "adapter_model.safetensors"
STATE = "state.json"
_ROUND = re.compile(r"round-\d{4,}")
_RERUN = "rerun without --resume to start over"


@dataclass
class Checkpoint:
    """The server's state after round `round`."""

    round: int
    adapter: AdapterState
    aggregator_state: dict[str, Any] = field(default_factory=dict)
    realign_layers: bytes | None = None
    realigner_state: dict[str, Any] = field(default_factory=dict)
    history: list[RoundRecord] = field(default_factory=list)  # the rounds so far
    ledger: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)


class CheckpointStore:
    """Checkpoints of one run in `folder`, tagged with `identity` (spec hash, input digest)."""

    def __init__(self, folder: Path, identity: dict[str, str], lora: LoraConfig, keep: int = 2):
        self.folder, self.identity, self.lora, self.keep = Path(folder), identity, lora, keep

    def save(self, checkpoint: Checkpoint, aggregator: str) -> Path:
        """Write `checkpoint` atomically as round-NNNN/; keep only the newest `keep` ones."""
        self._check_folder()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._recover()
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
            replace_folder(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._prune()
        return target

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None; an ArtifactError if it belongs to another run."""
        self._recover()
        rounds = self._rounds()
        if not rounds:
            return None
        folder = rounds[-1]
        state = _verified_state(folder)
        if state["identity"] != self.identity:
            raise ArtifactError(
                f"checkpoint {folder} came from a different spec or quantize output "
                f"(spec hash {state['identity'].get('spec_hash')} vs {self.identity.get('spec_hash')}, "
                f"input {state['identity'].get('quantize')} vs {self.identity.get('quantize')}); rerun without --resume to start over"
            )
        try:
            return _read(folder, state)
        except Exception as exc:  # hashes matched, so written so by another version (safetensors raises its own type)
            raise ArtifactError(f"checkpoint {folder} cannot be read ({type(exc).__name__}: {exc}); {_RERUN}") from None

    def clear(self) -> int:
        """Delete every checkpoint (a fresh run); returns how many there were. Only round folders and
        write leftovers go: anything else a user put into the folder stays, and so does the folder."""
        self._check_folder()
        count = len(self._rounds())
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                if path.is_dir() and not path.is_symlink() and (_ROUND.fullmatch(path.name) or _is_leftover(path.name)):
                    shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.folder.rmdir()
        return count

    def _check_folder(self) -> None:
        if self.folder.is_symlink() or (self.folder.exists() and not self.folder.is_dir()):
            raise ArtifactError(
                f"{self.folder}: a file or link sits where round checkpoints go, and fedsoda replaces only "
                "folders it wrote; move it out of the way, or choose another --workdir"
            )

    def _rounds(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob("round-*") if _ROUND.fullmatch(p.name) and (p / STATE).is_file())

    def _recover(self) -> None:
        """Put back every round whose swap was killed between its two renames (see replace_folder)."""
        if not self.folder.is_dir():
            return
        for retired in self.folder.glob(".round-*.retired-*"):
            name = retired.name[1:].partition(".retired-")[0]
            if _ROUND.fullmatch(name) and _is_leftover(retired.name):
                recover_folder(self.folder / name, complete=lambda folder: (folder / STATE).is_file())

    def _prune(self) -> None:
        for old in self._rounds()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        self._recover()  # so that a retired round still missing from its place is not taken for a leftover
        for stale in self.folder.glob(".round-*"):  # left by a run killed mid-write, or mid-delete of a replaced round
            if stale.is_dir() and _is_leftover(stale.name):
                shutil.rmtree(stale, ignore_errors=True)

    def _write_state(self, folder: Path, checkpoint: Checkpoint) -> None:
        """state.json (written last: its presence marks a complete checkpoint) and rng.safetensors."""
        from safetensors.torch import save_file

        rng = dict(checkpoint.rng)
        torch_state = rng.pop("torch", None)
        if torch_state is not None:
            save_file({"torch": torch_state}, folder / "rng.safetensors")
        state = {
            "round": checkpoint.round,
            "identity": self.identity,
            "history": [record.to_json() for record in checkpoint.history],  # as metrics.jsonl holds them
            "ledger": checkpoint.ledger,
            "rng": rng,
            "files": _file_hashes(folder),
        }
        state = json.loads(json.dumps(state, sort_keys=True))  # hashed as it will read back: int keys become strings
        state["state_sha256"] = _content_hash(state)
        (folder / STATE).write_text(json.dumps(state, sort_keys=True))


def _is_leftover(name: str) -> bool:
    """A scratch folder of `save` (.round-NNNN.<hex>.tmp) or a replaced round (.round-NNNN.retired-<hex>)."""
    return re.fullmatch(r"\.round-\d{4,}\.(?:[0-9a-f]{8}\.tmp|retired-[0-9a-f]{8})", name) is not None


def _file_hashes(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file in a checkpoint folder except state.json."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() != STATE
    }


def _content_hash(state: dict[str, Any]) -> str:
    """sha256 of state.json's content (without this hash), independent of its formatting."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _verified_state(folder: Path) -> dict[str, Any]:
    """state.json of a checkpoint, after checking it and every file it lists against their sha256."""
    path = folder / STATE
    try:
        state = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path}: corrupt checkpoint state ({type(exc).__name__}); {_RERUN}") from None
    files = state.get("files") if isinstance(state, dict) else None
    if (
        not isinstance(files, dict)
        or not isinstance(state.get("state_sha256"), str)
        or not isinstance(state.get("identity"), dict)
    ):
        raise ArtifactError(
            f"{path}: checkpoint state without its integrity record (damaged, or written by an older fedsoda); {_RERUN}"
        )
    if _content_hash(state) != state["state_sha256"]:
        raise ArtifactError(f"{path}: checkpoint state no longer matches its sha256 (modified or corrupt); {_RERUN}")
    found = _file_hashes(folder)
    for rel in sorted(set(files) | set(found)):
        if rel not in found:
            raise ArtifactError(f"{folder / rel}: listed in checkpoint {folder.name} but missing; {_RERUN}")
        if rel not in files:
            raise ArtifactError(f"{folder / rel}: not part of checkpoint {folder.name} as written; remove it, or {_RERUN}")
        if found[rel] != files[rel]:
            raise ArtifactError(
                f"{folder / rel}: content no longer matches checkpoint {folder.name}'s sha256 (modified or corrupt); {_RERUN}"
            )
    return state


def write_peft_adapter(folder: Path, adapter: AdapterState, lora: LoraConfig) -> Path:
    """An adapter folder that `PeftModel.from_pretrained(sub_llm, folder)` loads."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.items()}, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    lora.save_pretrained(str(folder))
    return folder


def read_peft_adapter(folder: Path) -> AdapterState:
    from safetensors.torch import load_file

    return load_file(folder / ADAPTER_WEIGHTS)


def write_state(folder: Path, stem: str, state: dict[str, Any], owner: str) -> None:
    """A flat state dict as `<stem>.safetensors` (tensor values) + `<stem>.json` (the rest)."""
    import torch
    from safetensors.torch import save_file

    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        shown = type(state).__name__ if not isinstance(state, dict) else "a dict with non-string keys"
        raise PluginError(
            f"{owner} returned {shown}, expected a dict of names to tensors and JSON values "
            "(an empty dict when there is no state); fix the plugin"
        ) from None
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
    legacy = np.random.get_state()  # the legacy tuple; numpy's stub types this no-argument call as the dict form
    return {
        "python": [version, list(internal), gauss],
        "numpy": [legacy[0], legacy[1].tolist(), *legacy[2:]],  # type: ignore[index]  # numpy stub gap, see get_state above
        "torch": torch.get_rng_state(),
    }


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
        history=[RoundRecord.from_json(record) for record in state["history"]],
        ledger=state["ledger"],
        rng=rng,
    )
