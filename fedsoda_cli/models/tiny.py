"""Tiny randomly initialised models of real architectures, for fast tests and dry runs.

In: a tiny model name and a tokenizer (its vocabulary sizes the embeddings). Out: a seeded model
with identical weights on every call, whatever the global RNG state.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

TINY_LLAMA = "tiny-random-llama"
TINY_QWEN2 = "tiny-random-qwen2"

_ARCHITECTURES = {
    TINY_LLAMA: (LlamaConfig, LlamaForCausalLM),
    TINY_QWEN2: (Qwen2Config, Qwen2ForCausalLM),
}

_SHAPE = dict(
    num_hidden_layers=6,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
)


def build_tiny_random(
    name: str, tokenizer: PreTrainedTokenizerBase, *, dtype: torch.dtype = torch.float32, seed: int = 0, **config_overrides
) -> PreTrainedModel:
    """A tiny model (`tiny-random-llama` or `tiny-random-qwen2`) with `dtype` parameters, eval mode,
    6 layers of hidden 64, vocabulary = len(tokenizer). `config_overrides` replace any config field
    (tests use them, e.g. for sliding-window layers)."""
    config_cls, model_cls = _ARCHITECTURES[name]
    config = config_cls(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**_SHAPE, **config_overrides},
    )
    # fork_rng leaves the caller's RNG stream untouched while the init draws from our seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    # Cast parameters only: like from_pretrained(dtype=bf16), the RoPE inv_freq buffers stay float32
    # (model.to(bf16) would round them, and a saved-and-reloaded copy would then differ).
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.to(dtype)
    model.config.dtype = dtype
    return model.eval()
