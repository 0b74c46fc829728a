"""LoRA adapters through the layer map: sub-LLM layer k <-> original layer kept[k]."""

from __future__ import annotations

import copy

import pytest
import torch

from fedsoda_cli.errors import ModelError
from fedsoda_cli.models import adapters
from fedsoda_cli.models.layers import drop_layers
from fedsoda_cli.models.load import load_causal_lm
from fedsoda_cli.spec.schema import LoraSpec, ModelSpec

KEPT = [0, 1, 3, 5]  # the tiny llama (6 layers) without layers 2 and 4
LORA = LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def full_and_sub():
    torch.set_num_threads(1)
    full, _ = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    sub = copy.deepcopy(full)
    assert drop_layers(sub, [2, 4]) == KEPT
    return full, sub


def trained_sub_adapter(sub) -> dict[str, torch.Tensor]:
    """A sub-LLM adapter whose every tensor is distinct and non-zero (as if trained)."""
    peft_model = adapters.attach_lora(copy.deepcopy(sub), LORA)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
    return adapters.adapter_state(peft_model)


def test_mapping_puts_each_module_on_its_original_layer(full_and_sub):
    _, sub = full_and_sub
    state = trained_sub_adapter(sub)
    full_state = adapters.sub_to_full_adapter(state, KEPT)
    assert len(full_state) == len(state)
    for key, value in state.items():
        k = adapters.layer_index(key)
        mapped = key.replace(f".layers.{k}.", f".layers.{KEPT[k]}.")
        assert torch.equal(full_state[mapped], value)
    assert {adapters.layer_index(k) for k in full_state} == set(KEPT)


def test_layers_path_is_not_assumed():
    key = "base_model.model.transformer.h.2.attn.c_attn.lora_A.weight"
    assert adapters.sub_to_full_adapter({key: torch.ones(1)}, [0, 4, 7], layers_path="transformer.h") == {
        "base_model.model.transformer.h.7.attn.c_attn.lora_A.weight": torch.ones(1)
    }
    assert adapters.layer_index("base_model.model.lm_head.lora_A.weight") is None


def test_an_adapter_for_more_layers_than_the_sub_llm_is_refused():
    with pytest.raises(ModelError, match="sub-LLM layer 4"):
        adapters.sub_to_full_adapter({"base_model.model.model.layers.4.q_proj.lora_A.weight": torch.ones(1)}, KEPT)


def test_attach_lora_limits_layers(full_and_sub):
    full, _ = full_and_sub
    peft_model = adapters.attach_lora(copy.deepcopy(full), LORA, layers=KEPT)
    with_lora = {adapters.layer_index(n) for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert with_lora == set(KEPT)


def test_teacher_with_mapped_adapter_matches_sub_weights(full_and_sub):
    full, sub = full_and_sub
    state = trained_sub_adapter(sub)
    teacher = adapters.attach_lora(copy.deepcopy(full), LORA, layers=KEPT)
    adapters.load_adapter_state(teacher, adapters.sub_to_full_adapter(state, KEPT))
    loaded = adapters.adapter_state(teacher)
    expected = adapters.sub_to_full_adapter(state, KEPT)  # each sub-LLM tensor, on its original layer
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_read_adapter_dir_round_trips(tmp_path, full_and_sub):
    _, sub = full_and_sub
    peft_model = adapters.attach_lora(copy.deepcopy(sub), LORA)
    peft_model.save_pretrained(tmp_path / "a")
    state, lora = adapters.read_adapter_dir(tmp_path / "a")
    assert lora == LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=sorted(LORA.target_modules))
    assert state.keys() == adapters.adapter_state(peft_model).keys()
    with pytest.raises(ModelError, match="adapter_config.json"):
        adapters.read_adapter_dir(tmp_path)
