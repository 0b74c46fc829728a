"""What a client model will weigh on disk, predicted from the float model before it is quantized.

`prune.storage_budget` must choose the layers to remove before quantize has written anything, so
the bytes of the client model (`quantize`'s model/ folder) are predicted as

    bytes(k kept decoder layers) = fixed + k x per_layer

from the float model itself: every decoder layer of a family has the same tensors, so one layer's
linear weights are serialized with the very bnb calls quantize uses (`quantize_linear_weight`) and
their tensor bytes are exact. What is not tensor data (the safetensors headers, config.json with its
quantization_config, client_model.json, the tokenizer files) is bounded from above rather than
reconstructed byte for byte: a budget must never be exceeded, so the prediction errs on the heavy
side, and quantize records the actual bytes next to it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedsoda_cli.spec.schema import QuantizeSpec

# Upper bounds for what is not tensor data. A safetensors header entry is
# '"<key>":{"dtype":"BF16","shape":[a,b],"data_offsets":[x,y]},' : the key plus at most ~80
# characters for 2-D shapes and 12-digit offsets; the quantization_config and client_model.json
# that quantize adds to the folder are well under 4 KiB (measured: about 1 KiB).
HEADER_BYTES_PER_TENSOR = 96
FOLDER_SLACK_BYTES = 4096


@dataclass(frozen=True)
class StoragePrediction:
    """The predicted client-model bytes: `fixed + kept_layers x per_layer`."""

    fixed: int
    per_layer: int

    def bytes_with(self, kept_layers: int) -> int:
        return self.fixed + kept_layers * self.per_layer

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def predict_client_bytes(model, tokenizer, quant: QuantizeSpec, scratch: Path) -> StoragePrediction:
    """The storage model of `model` (float, full depth) quantized with `quant`: exact tensor bytes,
    bounded headers and files. `scratch`: a folder of the caller's (the stage folder) where the
    tokenizer is saved for a moment to weigh its files."""
    from fedsoda_cli.models.layers import decoder_layers, decoder_layers_path
    from fedsoda_cli.models.quantized import embedding_weights, quantize_linear_weight

    layers = decoder_layers(model)
    prefix = decoder_layers_path(model) + "."
    per_layer = 0
    first = layers[0]
    for name, module in first.named_modules():
        if isinstance(module, torch.nn.Linear) and quant.quant_type != "none":
            for key, tensor in quantize_linear_weight(module.weight, quant.quant_type, quant.double_quant).items():
                per_layer += _nbytes(tensor) + _header(f"{prefix}0.{name}.{key}")
            if module.bias is not None:
                per_layer += 2 * module.bias.numel() + _header(f"{prefix}0.{name}.bias")
    linear_params = (
        {id(m.weight) for m in first.modules() if isinstance(m, torch.nn.Linear)} if quant.quant_type != "none" else set()
    )
    linear_biases = (
        {id(m.bias) for m in first.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
        if quant.quant_type != "none"
        else set()
    )
    for name, param in first.named_parameters():
        if id(param) not in linear_params and id(param) not in linear_biases:
            per_layer += 2 * param.numel() + _header(f"{prefix}0.{name}")

    int8 = {id(w) for _, w in embedding_weights(model)} if quant.embeddings == "int8" else set()
    in_layers = {id(p) for p in layers.parameters()}
    fixed, seen = 0, set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or id(param) in in_layers:
            continue
        seen.add(id(param))
        if id(param) in int8:  # int8 rows plus one float32 scale per row (quantized.int8_rows)
            fixed += param.numel() + 4 * param.shape[0] + 2 * _header(name + ".row_scale")
        else:
            fixed += 2 * param.numel() + _header(name)
    fixed += 2 * (8 + _header("__metadata__"))  # each safetensors file: length prefix and metadata
    fixed += _folder_files_bytes(model, tokenizer, scratch) + FOLDER_SLACK_BYTES
    return StoragePrediction(fixed=int(fixed), per_layer=int(per_layer))


def layers_to_remove(prediction: StoragePrediction, num_layers: int, budget_bytes: int) -> int:
    """The fewest decoder layers whose removal brings the predicted bytes within the budget
    (`num_layers + 1` when even removing every layer would not)."""
    for removed in range(num_layers + 1):
        if prediction.bytes_with(num_layers - removed) <= budget_bytes:
            return removed
    return num_layers + 1


def budget_bytes(budget: float, full_model_bf16_bytes: int) -> int:
    """`prune.storage_budget` in bytes: a value up to 1 is a fraction of the full model in bf16
    (quantize's `full_model_bf16_bytes`: parameter count x 2), a larger one is bytes."""
    return int(budget * full_model_bf16_bytes) if budget <= 1 else int(budget)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _header(key: str) -> int:
    return len(key.encode()) + HEADER_BYTES_PER_TENSOR


def _folder_files_bytes(model, tokenizer, scratch: Path) -> int:
    """Bytes of config.json, generation_config.json and the tokenizer files, as saved."""
    with tempfile.TemporaryDirectory(prefix=".storage-", dir=scratch) as tmp:
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        files = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    return files + len(json.dumps(model.config.to_dict(), indent=2)) + 1
