"""LoRA adapters across the layer map: sub-LLM layer k is original layer kept[k] of the full LLM.

In: adapter state dicts in peft's serialized form (`get_peft_model_state_dict` / the
`adapter_model.safetensors` of a PEFT folder), e.g.
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`, and the layer map `kept`.
Out: the same tensors keyed by the full LLM's layer indices (pruned layers have no LoRA, i.e. a zero
update, or all-zero LoRA tensors for a stock-PEFT plugin folder), or a LoRA-wrapped model.

The layer index inside a key is found after `layers_path` (the model's decoder-layer ModuleList,
`models.layers.decoder_layers_path`) when given, else as the first all-digit path segment, which is
the decoder-layer index in every HF decoder-only model (their only per-layer ModuleList).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedsoda_cli.errors import ArtifactError, ModelError
from fedsoda_cli.spec.schema import LoraSpec

if TYPE_CHECKING:
    import torch  # imported where used: a client worker reads LoraShape before it sets its torch threads

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraShape:
    """The [lora] keys that shape the LoRA modules (what `lora_config` and `attach_lora` read): the
    frozen form a client worker and the realigner get, in place of the whole section. Which layers
    get LoRA is the caller's `layers` argument (client-model or original indices)."""

    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))  # a JSON list comes back as a tuple

    @classmethod
    def from_spec(cls, lora: LoraSpec) -> LoraShape:
        return cls(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=tuple(lora.target_modules))


def sub_to_full_adapter(
    adapter_state: dict[str, torch.Tensor], kept: list[int], *, layers_path: str | None = None, num_layers: int | None = None
) -> dict[str, torch.Tensor]:
    """Rename `...layers.{k}...` to `...layers.{kept[k]}...` (sub-LLM -> full LLM); tensors outside
    the decoder layers (e.g. lm_head) keep their names.

    With `num_layers` (the full LLM's, from the layer map), every LoRA tensor of a layer the adapter
    does not cover (a pruned one) is added as zeros of the same shape, so that stock
    `PeftModel.from_pretrained` loads the result with no missing key and no random init, and the
    update B@A of those layers is exactly zero: the plugin adapter. A sub-LLM layer the map does not
    have then means the adapter and the layer map come from different runs (ArtifactError); without
    `num_layers` the adapter belongs to another sub-LLM (ModelError).
    """
    import torch

    pattern = _index_pattern(layers_path)
    mapped: dict[str, torch.Tensor] = {}
    templates: dict[tuple[str, str], torch.Tensor] = {}  # (prefix, suffix) around the index -> one tensor with that role
    for key, value in adapter_state.items():
        match = pattern.search(key)
        if match is None:
            mapped[key] = value
            continue
        k = int(match.group(2))
        if k >= len(kept):
            if num_layers is not None:
                raise ArtifactError(
                    f"adapter tensor {key!r} is for sub-LLM layer {k}, but the layer map keeps only {len(kept)} layers; "
                    "the adapter and quantize/layer_map.json come from different runs"
                )
            raise ModelError(
                f"adapter has LoRA weights for sub-LLM layer {k}, but the sub-LLM has {len(kept)} layers; the adapter belongs to another sub-LLM"
            )
        head, tail = key[: match.start(2)], key[match.end(2) :]
        mapped[f"{head}{kept[k]}{tail}"] = value
        templates.setdefault((head, tail), value)
    if num_layers is not None:
        for (head, tail), value in templates.items():
            for layer in range(num_layers):
                mapped.setdefault(f"{head}{layer}{tail}", torch.zeros_like(value))
    return mapped


def layer_index(key: str, layers_path: str | None = None) -> int | None:
    """The decoder-layer index inside a state-dict key, or None if the key is outside the layers."""
    match = _index_pattern(layers_path).search(key)
    return int(match.group(2)) if match else None


def _index_pattern(layers_path: str | None) -> re.Pattern:
    if layers_path:
        return re.compile(r"(^|\.)" + re.escape(layers_path) + r"\.(\d+)(?=\.)")
    return re.compile(r"(^|\.)(\d+)(?=\.)")


def lora_config(lora: LoraSpec | LoraShape, layers: Sequence[int] | None = None, *, layers_pattern: str | None = None):
    """A peft LoraConfig from the [lora] section; `layers` limits LoRA to those layer indices."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        layers_to_transform=list(layers) if layers is not None else None,
        layers_pattern=layers_pattern if layers is not None else None,
    )


def attach_lora(model, lora: LoraSpec | LoraShape, layers: Sequence[int] | None = None):
    """Wrap `model` (in place, as peft does) with fresh LoRA modules on `lora.target_modules` of
    the decoder layers `layers` (all when None); returns the PeftModel."""
    from peft import get_peft_model

    from fedsoda_cli.models.layers import decoder_layers_path

    pattern = decoder_layers_path(model).rsplit(".", 1)[-1]
    try:
        return get_peft_model(model, lora_config(lora, layers, layers_pattern=pattern))
    except ValueError as exc:
        raise ModelError(
            f"lora.target_modules {list(lora.target_modules)}: {str(exc).splitlines()[0][:200]}; name linear modules of the model's decoder layers"
        ) from exc


def load_adapter_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    """Load a serialized adapter into a LoRA-wrapped model; ModelError if any key does not fit."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ModelError(
            f"adapter weight {unexpected[0]} has no LoRA module in the model ({len(unexpected)} such keys); check lora.target_modules and the layer map"
        )


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The serialized adapter of a LoRA-wrapped model (detached copies)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def read_adapter_dir(adapter_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LoraSpec]:
    """(adapter state, the LoraSpec it was made with) of a PEFT adapter folder."""
    import json

    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    weights, config = folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG
    if not weights.is_file() or not config.is_file():
        raise ModelError(
            f"adapter {folder}: needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a PEFT adapter folder, e.g. <workdir>/federate/adapter)"
        )
    raw = json.loads(config.read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"adapter {folder}: peft_type {raw.get('peft_type')!r}; only LoRA adapters are supported")
    targets = raw.get("target_modules") or []
    lora = LoraSpec(
        r=raw["r"],
        alpha=raw.get("lora_alpha", raw["r"]),
        dropout=raw.get("lora_dropout", 0.0),
        target_modules=sorted(targets) if isinstance(targets, (list, set)) else [targets],
    )
    return load_file(weights), lora
