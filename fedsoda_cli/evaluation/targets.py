"""The models eval measures: plugin (full LLM + global adapter), sub (client sub-LLM + adapter),
zero-shot (full LLM alone).

The plugin adapter is a standard PEFT adapter folder for the FULL model: the sub-LLM's LoRA
tensors renamed from sub-LLM layer k to original layer kept[k]; the pruned layers get all-zero
LoRA tensors (A and B), so their update B@A is exactly zero and stock
`PeftModel.from_pretrained(full_model, folder)` loads it with no missing key and no random init.
With a plug-in scale s (`eval.plugin_scale`) every B is multiplied by s, so the folder itself carries
the update W + s (alpha / r) B A: stock PEFT, `fedsoda export` and eval read the same model.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fedsoda_cli.errors import ArtifactError, ModelError
from fedsoda_cli.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, sub_to_full_adapter
from fedsoda_cli.models.layer_map import LayerMap, read_layer_map

TARGETS = ("plugin", "sub", "zero-shot")


def layer_map_for(spec, path: Path, full_model) -> LayerMap:
    """The run's layer map; a method that prunes nothing (fedpetuning) may have none: all layers kept."""
    from fedsoda_cli.models.layers import decoder_layers

    if not path.exists() and spec.run.method == "fedpetuning":
        n = len(decoder_layers(full_model))
        return LayerMap(list(range(n)), n)
    return read_layer_map(path)


def write_plugin_adapter(sub_adapter: Path, layer_map: LayerMap, layers_path: str, out_dir: Path, *, scale: float = 1.0) -> Path:
    """Write the plugin adapter folder (config + safetensors) for the full model into `out_dir`, its
    update scaled by `scale`."""
    from safetensors.torch import load_file, save_file

    weights, config = sub_adapter / ADAPTER_WEIGHTS, sub_adapter / ADAPTER_CONFIG
    if not weights.is_file() or not config.is_file():
        raise ArtifactError(
            f"{sub_adapter}: not a PEFT adapter folder ({ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}); rerun `fedsoda federate SPEC`"
        )
    settings = json.loads(config.read_text())
    if settings.get("layers_to_transform") is not None:
        # indices there are sub-LLM layers; the full model needs original ones
        settings["layers_to_transform"] = [layer_map.kept[k] for k in settings["layers_to_transform"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    full = sub_to_full_adapter(load_file(weights), layer_map.kept, layers_path=layers_path, num_layers=layer_map.num_layers)
    if scale != 1.0:
        # B, not A: the update (alpha / r) B A scales linearly in B, and A stays the shared projection
        full = {k: v * scale if "lora_B" in k else v for k, v in full.items()}
    save_file({k: v.contiguous() for k, v in full.items()}, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(settings, indent=2, sort_keys=True))
    return out_dir


def with_adapter(model, adapter_dir: Path):
    """`model` wrapped by stock PEFT with the adapter folder loaded (inference mode), float32 LoRA."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ArtifactError(
            f"{adapter_dir}: adapter does not fit the model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); rerun the stage that wrote it"
        ) from None


@contextmanager
def plugin_model(full_model, adapter_state: dict[str, torch.Tensor], adapter_config, layer_map: LayerMap) -> Iterator[object]:
    """The full model with a sub-LLM adapter (in memory) mapped onto it, loaded through stock PEFT;
    on exit the LoRA layers are removed again and `full_model` is as before.

    `adapter_config` is the sub-LLM's peft LoraConfig. For per-round evaluation inside federate.
    """
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="fedsoda-plugin-") as scratch:
        sub_dir = Path(scratch) / "sub"
        sub_dir.mkdir()
        save_file(
            {k: v.detach().contiguous() for k, v in adapter_state.items()}, sub_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"}
        )
        adapter_config.save_pretrained(sub_dir)
        with plugged(full_model, sub_dir, layer_map) as model:
            yield model


@contextmanager
def plugged(full_model, sub_adapter: Path, layer_map: LayerMap, *, scale: float = 1.0) -> Iterator[object]:
    """The full model with the sub-LLM adapter folder `sub_adapter` mapped onto it at plug-in scale
    `scale` (written to a scratch folder), loaded through stock PEFT; on exit the LoRA layers are
    removed again and `full_model` is as before."""
    from fedsoda_cli.models.layers import decoder_layers_path

    with tempfile.TemporaryDirectory(prefix="fedsoda-plugin-") as scratch:
        folder = write_plugin_adapter(
            sub_adapter, layer_map, decoder_layers_path(full_model), Path(scratch) / "plugin", scale=scale
        )
        model = with_adapter(full_model, folder)
        try:
            yield model
        finally:
            model.unload()  # takes the LoRA layers out of full_model in place


def load_full(spec):
    """The run's full LLM (model.*) in float32, and its tokenizer."""
    from fedsoda_cli.models.load import load_causal_lm

    return load_causal_lm(spec.model, dtype=torch.float32)


def load_sub(client_model: Path, adapter_dir: Path | None, realigned_layers: Path | None = None):
    """The client's (quantized) sub-LLM computing in float32, with the global adapter attached and,
    when federate realigned, the last realigned partial layers swapped in (what clients hold).
    `adapter_dir` None: the client model as a client receives it, before any training (in eval mode)."""
    from fedsoda_cli.oda.realign import apply_partial_layers

    model, tokenizer = _load_client_model(client_model)
    if realigned_layers is not None and realigned_layers.is_file():
        apply_partial_layers(model, realigned_layers)
    if adapter_dir is None:
        return model.eval(), tokenizer
    return with_adapter(model, adapter_dir), tokenizer


def check_layer_map(full_model, layer_map: LayerMap, where: Path) -> None:
    """The layer map must describe this full model (same number of decoder layers)."""
    from fedsoda_cli.models.layers import decoder_layers

    n = len(decoder_layers(full_model))
    if n != layer_map.num_layers:
        raise ModelError(
            f"{where}: the layer map is for a model with {layer_map.num_layers} layers, but model.* has {n}; the spec's model changed since prune ran: rerun `fedsoda run SPEC`"
        )


def _load_client_model(path: Path):
    from fedsoda_cli.models.quantized import load_client_model

    return load_client_model(path, compute_dtype=torch.float32, prepare_for_training=False)
