"""Generic decoder-layer surgery and residual-stream capture, for any HF decoder-only model.

Nothing here assumes llama: the decoder blocks are found as the ModuleList whose length equals the
text config's `num_hidden_layers` (llama, qwen2, mistral, gemma, phi, ... all have one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from fedsoda_cli.errors import ModelError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

# Config fields that are lists but never per-layer, even when their length happens to match.
_NOT_PER_LAYER = {"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "eos_token_id"}


def text_config(model: nn.Module):
    """The config that owns `num_hidden_layers` (the model's own, or its text sub-config)."""
    config: PretrainedConfig = model.config  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
    return config.get_text_config()


def decoder_layers_path(model: nn.Module) -> str:
    """Dotted attribute path of the decoder-block ModuleList, e.g. "model.layers"."""
    n_layers = text_config(model).num_hidden_layers
    candidates = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    # Prefer lists whose blocks carry a `layer_idx` somewhere (attention does, for its KV cache);
    # named_modules is pre-order, so among equals the outermost list comes first.
    with_idx = [name for name in candidates if any(hasattr(sub, "layer_idx") for sub in model.get_submodule(name).modules())]
    found = with_idx or candidates
    if not found:
        raise ModelError(
            f"model {type(model).__name__}: no ModuleList of {n_layers} decoder layers (config.num_hidden_layers) found; this architecture is not supported"
        )
    return found[0]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks, in order."""
    return _module_list(model, decoder_layers_path(model))


def _module_list(model: nn.Module, path: str) -> nn.ModuleList:
    layers = model.get_submodule(path)
    assert isinstance(layers, nn.ModuleList)  # decoder_layers_path found it as one
    return layers


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return cast("PreTrainedModel", get_base() if callable(get_base) else model)


def drop_layers(model: nn.Module, remove: Sequence[int]) -> list[int]:
    """Remove decoder layers `remove` (original indices) in place; return `kept`, the original
    index of each remaining layer in ascending order. Fixes config.num_hidden_layers, every
    per-layer config list (layer_types, ...) and every `layer_idx`, so KV-cache generation works."""
    path = decoder_layers_path(model)
    layers = _module_list(model, path)
    n = len(layers)
    drop = set(remove)
    bad = sorted(i for i in drop if not 0 <= i < n)
    if bad:
        raise ModelError(f"drop_layers: layer indices {bad} out of range 0..{n - 1}")
    kept = [i for i in range(n) if i not in drop]
    if not kept:
        raise ModelError(f"drop_layers: removing all {n} layers leaves no model; remove fewer layers")

    new_layers = nn.ModuleList([layers[i] for i in kept])
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new_layers)
    for new_idx, layer in enumerate(new_layers):
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new_idx  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
    _slice_config(text_config(model), n, kept)
    # Models cache a flag derived from layer_types at init (qwen2, mistral: has_sliding_layers).
    if hasattr(parent, "has_sliding_layers"):
        layer_types = getattr(parent.config, "layer_types", None)
        if layer_types is not None:
            parent.has_sliding_layers = "sliding_attention" in layer_types  # type: ignore[assignment]  # as layer_idx above
    return kept


def _slice_config(config, n_layers: int, kept: list[int]) -> None:
    """Keep only the `kept` entries of every per-layer list in `config`; set num_hidden_layers."""
    for key, value in list(vars(config).items()):
        if key in _NOT_PER_LAYER or key.startswith("_"):
            continue
        if isinstance(value, (list, tuple)) and len(value) == n_layers:
            setattr(config, key, type(value)(value[i] for i in kept))
    # Qwen2/Mistral-style "layers >= max_window_layers use sliding windows": count what survives.
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers = sum(1 for i in kept if i < config.max_window_layers)
    config.num_hidden_layers = len(kept)


@contextmanager
def residual_stream(model: nn.Module, fn: Callable[[int, torch.Tensor], None], *, final: bool = True) -> Iterator[None]:
    """While active, each forward pass calls `fn(l, h)` with `h` the residual-stream input of decoder
    layer `l` (position in the current, possibly pruned, ModuleList; map through `kept` for original
    indices), and, if `final`, `fn(k, h)` with the output of the last layer k-1 (before the final
    norm), so l runs over every boundary 0..k. `h` is the live tensor (not detached: the
    distillation backpropagates through it); detach in `fn` if you only read it. With gradient
    checkpointing the hooks fire again during recomputation."""
    layers = decoder_layers(model)
    handles = []

    def pre_hook(index: int):
        def hook(module, args, kwargs):
            # transformers 5 passes hidden_states positionally, but some models use the keyword.
            fn(index, args[0] if args else kwargs["hidden_states"])

        return hook

    def out_hook(module, args, output):
        fn(len(layers), output[0] if isinstance(output, tuple) else output)

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        if final:
            handles.append(layers[-1].register_forward_hook(out_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
