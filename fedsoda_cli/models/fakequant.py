"""The client model emulated in float: what `quantize` will store, without building bnb modules.

Alignment must see the sub-LLM as clients run it (NF4 + double quantization by default), but a bnb
`Linear4bit` dequantizes its weight on every forward pass on CPU and cannot train its base weight.
So the deployed model is emulated on the float model instead:

- `fake_quantize(weight, quant)` returns the float weight a client computes with: for NF4/FP4 it
  is `bitsandbytes.functional.quantize_4bit` (blocksize 64, the absmax double-quantized when
  `quant.double_quant`) followed by `dequantize_4bit`, the very calls behind `Params4bit` and the
  fp32 `Linear4bit` forward, so the values are identical (tested against a client model). int8
  emulates the weight rounding of LLM.int8 only (per-row absmax through float16); its activation
  quantization is not emulated. "none" rounds to bf16.
- `deployed(model, quant, ...)` swaps these values into the decoder linears in place (and rounds
  every other float to bf16, or int8 embeddings, as `quantize_checkpoint` does), and puts the
  float weights back on exit. Layers listed in `trainable` are left as float parameters; with
  `ste=True` their linears compute with `fake_quantize(W)` in the forward pass and pass the gradient
  straight through to the float master weight (W + (q(W) - W).detach()). Layers in `bf16` are
  rounded to bf16 instead of quantized (partial layers a client keeps in bf16).
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from fedsoda_cli.spec.schema import QuantizeSpec

BLOCKSIZE = 64


@torch.no_grad()
def fake_quantize(weight: torch.Tensor, quant: QuantizeSpec) -> torch.Tensor:
    """The float32 weight the client model computes with after `quant` stores `weight`."""
    w = weight.detach().to(torch.float32).contiguous()
    if quant.quant_type in ("nf4", "fp4"):
        from fedsoda_cli.models.quantized import _bnb

        functional = _bnb().functional
        packed, state = functional.quantize_4bit(
            w, blocksize=BLOCKSIZE, compress_statistics=quant.double_quant, quant_type=quant.quant_type, quant_storage=torch.uint8
        )
        return functional.dequantize_4bit(packed, state).to(torch.float32).view_as(w)
    if quant.quant_type == "int8":
        from fedsoda_cli.models.quantized import _bnb

        functional = _bnb().functional
        cb, scb, _ = functional.int8_vectorwise_quant(w.to(torch.float16))
        return (cb.float() * scb.float()[:, None] / 127.0).view_as(w)
    return w.to(torch.bfloat16).to(torch.float32)


def decoder_linears(model, layers: Iterable[int] | None = None) -> Iterator[tuple[int, str, torch.nn.Linear]]:
    """(layer index, name inside the layer, module) of every base nn.Linear of the decoder layers
    (all, or `layers`); LoRA's own linears are not base weights and are skipped."""
    from fedsoda_cli.models.layers import decoder_layers, unwrap

    stack = decoder_layers(unwrap(model))
    for k in range(len(stack)) if layers is None else layers:
        for name, module in stack[k].named_modules():
            if isinstance(module, torch.nn.Linear) and "lora_" not in name:
                yield k, name, module


@contextmanager
def deployed(
    model, quant: QuantizeSpec, *, trainable: Iterable[int] = (), ste: bool = False, bf16: Iterable[int] = ()
) -> Iterator[None]:
    """Within: `model` computes as the client model of `quant` (see module doc), except the decoder
    layers `trainable` (sub-LLM indices), which stay float and trainable (`ste`: fake-quantized in the
    forward pass, straight-through gradient). Every tensor is back to its float value on exit."""
    from fedsoda_cli.models.layers import unwrap
    from fedsoda_cli.models.quantized import embedding_weights, int8_rows

    base = unwrap(model)
    trainable, bf16 = set(trainable), set(bf16)
    originals: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    patched: list[torch.nn.Linear] = []
    keep_float = {id(m.weight) for k, _, m in decoder_linears(base, sorted(trainable))}
    if trainable:
        from fedsoda_cli.models.layers import decoder_layers

        stack = decoder_layers(base)
        keep_float |= {id(p) for k in trainable for p in stack[k].parameters()}
    embeddings = {id(w) for _, w in embedding_weights(base)} if quant.embeddings == "int8" else set()
    layer_weights = {id(m.weight): k for k, _, m in decoder_linears(base)}
    bf16_spec = QuantizeSpec(quant_type="none")

    def swap(param: torch.nn.Parameter, value: torch.Tensor) -> None:
        originals.append((param, param.data))
        param.data = value.to(param.dtype)

    try:
        seen: set[int] = set()
        for name, param in base.named_parameters():
            if id(param) in seen or id(param) in keep_float or not param.is_floating_point() or "lora_" in name:
                continue
            seen.add(id(param))
            if id(param) in layer_weights:
                swap(param, fake_quantize(param.data, bf16_spec if layer_weights[id(param)] in bf16 else quant))
            elif id(param) in embeddings:
                q, scale = int8_rows(param.data)
                swap(param, q.float() * scale[:, None])
            else:
                swap(param, param.data.to(torch.bfloat16))
        if ste:
            for _, _, module in decoder_linears(base, sorted(trainable)):
                # an instance attribute shadowing Linear.forward until `del` below restores the class's
                module.forward = types.MethodType(_ste_forward(quant), module)  # type: ignore[method-assign]
                patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward
        for param, value in reversed(originals):
            param.data = value


def _ste_forward(quant: QuantizeSpec):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.linear(x, w + (fake_quantize(w, quant).to(w.dtype) - w).detach(), self.bias)

    return forward
