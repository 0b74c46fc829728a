"""The tiny random built-in models: real architectures, identical weights on every build."""

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from fedsoda_cli.models.load import load_causal_lm
from fedsoda_cli.spec.schema import ModelSpec


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-qwen2"])
def test_same_weights_every_build_whatever_the_global_rng(name):
    torch.manual_seed(123)
    first, _ = load_causal_lm(ModelSpec(name=name))
    torch.manual_seed(999)
    rng = torch.random.get_rng_state()
    second, _ = load_causal_lm(ModelSpec(name=name))
    assert torch.equal(torch.random.get_rng_state(), rng), "building must not consume the global RNG"
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name, cls", [("tiny-random-llama", LlamaForCausalLM), ("tiny-random-qwen2", Qwen2ForCausalLM)])
def test_architecture(name, cls):
    model, tokenizer = load_causal_lm(ModelSpec(name=name))
    c = model.config
    assert type(model) is cls
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (
        6,
        64,
        4,
        2,
        128,
    )
    assert len(model.model.layers) == 6
    assert c.vocab_size == len(tokenizer) == 49152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings must be tied"
    assert not model.training
    assert tokenizer.pad_token is not None
    assert model.dtype == torch.float32
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    assert ids.shape[1] < 15, "the SmolLM2 tokenizer should split English text into word pieces"


def test_dtype_is_honoured():
    model, _ = load_causal_lm(ModelSpec(name="tiny-random-llama"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
