"""The layer map: which original layers of the full LLM the sub-LLM kept, and how it got there.

prune writes it (`layer_map.json` in its stage folder), align adds the partial layers and the layers
the client keeps in bf16, quantize copies it; every later reader takes it from quantize/. In JSON:
  kept            [original index of sub-LLM layer k, for each k], increasing
  removed_groups  [[original indices of one removed group], ...]; with kept, every layer once
  num_layers      L, the full LLM's decoder layers
  strategy, iterative              how prune chose (absent in hand-made maps)
  storage_budget  prune.storage_budget's record (only when it was set), which quantize checks
  partial_layers, bf16_layers      added by align (original indices)
Keys this module does not know are carried through a read/write unchanged, so a newer writer's
additions survive an older stage that rewrites the map.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedsoda_cli.errors import ArtifactError

LAYER_MAP = "layer_map.json"

# stages a `fedsoda <stage> SPEC` command reruns; any other stage folder is rerun through `fedsoda run`
_STAGE_COMMANDS = ("profile", "prune", "align", "quantize")


@dataclass(frozen=True, init=False)
class LayerMap:
    kept: list[int]
    num_layers: int
    removed_groups: list[list[int]]
    strategy: str | None = None
    iterative: bool | None = None
    storage_budget: dict[str, Any] | None = None
    partial_layers: list[int] | None = None
    bf16_layers: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, written back as they came

    # An own __init__ (not dataclass's + __post_init__) so that removed_groups may be left out while
    # the field itself is never None.
    def __init__(
        self,
        kept: list[int],
        num_layers: int,
        removed_groups: list[list[int]] | None = None,  # None: each run of consecutive removed layers is one group
        strategy: str | None = None,
        iterative: bool | None = None,
        storage_budget: dict[str, Any] | None = None,
        partial_layers: list[int] | None = None,
        bf16_layers: list[int] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        kept = [int(k) for k in kept]
        num_layers = int(num_layers)
        if removed_groups is None:
            removed_groups = _runs(sorted(set(range(num_layers)) - set(kept)))
        else:
            removed_groups = [[int(layer) for layer in group] for group in removed_groups]
        values = {
            "kept": kept,
            "num_layers": num_layers,
            "removed_groups": removed_groups,
            "strategy": strategy,
            "iterative": iterative,
            "storage_budget": storage_budget,
            "partial_layers": partial_layers,
            "bf16_layers": bf16_layers,
            "extra": {} if extra is None else extra,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerMap:
        known = {name: data[name] for name in _FIELDS if name in data}
        return cls(**known, extra={k: v for k, v in data.items() if k not in _FIELDS})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the order prune and align have always written them."""
        values = {name: getattr(self, name) for name in _FIELDS}
        return {**{k: v for k, v in values.items() if v is not None}, **self.extra}

    def with_alignment(self, partial_layers: list[int], bf16_layers: list[int]) -> LayerMap:
        """This map plus align's partial layers and bf16 layers (original indices)."""
        return replace(self, partial_layers=list(partial_layers), bf16_layers=list(bf16_layers))

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))


_FIELDS = ("kept", "removed_groups", "num_layers", "strategy", "iterative", "storage_budget", "partial_layers", "bf16_layers")


def read_layer_map(path: Path) -> LayerMap:
    """The layer map in the file `path` (a stage folder's layer_map.json), checked for what every
    reader relies on; ArtifactError naming the file and the command that rebuilds it."""
    rebuild = _rebuild_command(path)
    try:
        data = json.loads(path.read_text())
        kept, n = [int(k) for k in data["kept"]], int(data["num_layers"])
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no layer map; rerun `{rebuild}`") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: malformed layer map ({type(exc).__name__}: {exc}); rerun `{rebuild}`") from None
    if kept != sorted(set(kept)) or not kept or kept[0] < 0 or kept[-1] >= n:
        raise ArtifactError(f"{path}: 'kept' must be increasing original indices in 0..{n - 1}; rerun `{rebuild}`")
    try:
        layer_map = LayerMap.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: malformed layer map ({type(exc).__name__}: {exc}); rerun `{rebuild}`") from None
    if "removed_groups" not in data:
        raise ArtifactError(f"{path}: malformed layer map (no 'removed_groups'); rerun `{rebuild}`")
    removed = {layer for group in layer_map.removed_groups for layer in group}
    if sorted(set(kept) | removed) != list(range(n)):
        raise ArtifactError(f"{path}: kept and removed_groups do not cover layers 0..{n - 1} exactly once; rerun `{rebuild}`")
    return layer_map


def _rebuild_command(path: Path) -> str:
    stage = path.parent.name
    return f"fedsoda {stage} SPEC" if stage in _STAGE_COMMANDS else f"fedsoda run SPEC --from {stage} --force"


def _runs(layers: list[int]) -> list[list[int]]:
    """Sorted layer indices as runs of consecutive ones: [2, 3, 5] -> [[2, 3], [5]]."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and runs[-1][-1] == layer - 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return runs
