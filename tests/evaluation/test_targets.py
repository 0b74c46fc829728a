"""The plugin adapter: a stock-PEFT folder for the full model equal to the sub-LLM adapter moved to
its original layers (checked against merging the LoRA deltas into the full model by hand)."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict

from fedsoda_cli.errors import ArtifactError, ModelError
from fedsoda_cli.evaluation.targets import check_layer_map, plugin_model, write_plugin_adapter
from fedsoda_cli.federated.client import lora_config
from fedsoda_cli.models.adapters import sub_to_full_adapter
from fedsoda_cli.models.layer_map import LayerMap, read_layer_map
from fedsoda_cli.models.layers import decoder_layers, drop_layers
from fedsoda_cli.models.load import load_causal_lm
from fedsoda_cli.spec.schema import LoraSpec, ModelSpec

REMOVED = [2, 3]
LORA = LoraSpec(r=4, alpha=8)


def _trained_sub_adapter(tmp_path):
    """A sub-LLM (layers 2, 3 dropped) with a non-zero LoRA adapter saved as federate/adapter would be."""
    sub, _ = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    kept = drop_layers(sub, REMOVED)
    torch.manual_seed(1)
    peft = get_peft_model(sub, lora_config(LORA))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero; make the update visible
    peft.save_pretrained(tmp_path / "adapter")
    return kept, get_peft_model_state_dict(peft), tmp_path / "adapter"


def _merged_by_hand(full, state, kept):
    """Full model with W += scale * B @ A for every adapted linear of every kept layer."""
    scale = LORA.alpha / LORA.r
    layers = decoder_layers(full)
    with torch.no_grad():
        for name, a in state.items():
            if "lora_A" not in name:
                continue
            b = state[name.replace("lora_A", "lora_B")]
            k = int(name.split(".layers.")[1].split(".")[0])
            module_path = name.split(f".layers.{k}.")[1].rsplit(".lora_A", 1)[0]
            layers[kept[k]].get_submodule(module_path).weight += scale * b @ a
    return full


def test_stock_peft_loading_of_the_plugin_adapter_equals_hand_mapping(tmp_path):
    kept, state, adapter = _trained_sub_adapter(tmp_path)
    layer_map = LayerMap(kept, 6)
    plugin_dir = write_plugin_adapter(adapter, layer_map, "model.layers", tmp_path / "plugin")
    full, _ = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    ids = torch.tensor([[5, 17, 300, 42, 7, 1000]])
    with torch.no_grad():
        zero_shot = full(input_ids=ids).logits
        expected = _merged_by_hand(load_causal_lm(ModelSpec(name="tiny-random-llama"))[0], state, kept)(input_ids=ids).logits
        plugin = PeftModel.from_pretrained(full, str(plugin_dir))(input_ids=ids).logits
    assert torch.allclose(plugin, expected, atol=1e-5)
    assert not torch.allclose(plugin, zero_shot, atol=1e-3)  # the adapter does something
    # every layer has LoRA tensors; those of the pruned layers are all zero
    saved = json.loads((plugin_dir / "adapter_config.json").read_text())
    assert saved["r"] == 4
    mapped = sub_to_full_adapter(state, layer_map.kept, layers_path="model.layers", num_layers=layer_map.num_layers)
    assert len(mapped) == len(state) * 6 // 4
    assert all(t.abs().sum() == 0 for n, t in mapped.items() if ".layers.2." in n or ".layers.3." in n)


def test_plugin_model_context_attaches_then_restores_the_full_model(tmp_path):
    kept, state, adapter = _trained_sub_adapter(tmp_path)
    full, _ = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        before = full(input_ids=ids).logits
        with plugin_model(full, state, lora_config(LORA), LayerMap(kept, 6)) as model:
            inside = model(input_ids=ids).logits
        after = full(input_ids=ids).logits
        expected = _merged_by_hand(load_causal_lm(ModelSpec(name="tiny-random-llama"))[0], state, kept)(input_ids=ids).logits
    assert torch.allclose(inside, expected, atol=1e-5)
    assert torch.equal(before, after)
    assert not any("lora" in n for n, _ in full.named_modules())


def test_layer_map_errors_name_the_file(tmp_path):
    path = tmp_path / "layer_map.json"
    with pytest.raises(ArtifactError, match="no layer map"):
        read_layer_map(path)
    path.write_text('{"kept": [0, 5, 3], "num_layers": 6}')
    with pytest.raises(ArtifactError, match="increasing"):
        read_layer_map(path)
    path.write_text('{"kept": [0, 1, 4, 5], "removed_groups": [[2, 3]], "num_layers": 6}')
    assert read_layer_map(path) == LayerMap([0, 1, 4, 5], 6)
    full, _ = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    with pytest.raises(ModelError, match="8 layers"):
        check_layer_map(full, LayerMap([0, 1], 8), path)
    with pytest.raises(ArtifactError, match="sub-LLM layer 4"):
        sub_to_full_adapter(
            {"base_model.model.model.layers.4.self_attn.q_proj.lora_A.weight": torch.zeros(2, 2)},
            [0, 1, 5],
            layers_path="model.layers",
            num_layers=6,
        )
