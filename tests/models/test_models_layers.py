"""Layer surgery: pruned models compute exactly what the full model computes with those layers
skipped, keep KV-cache generation working, and work on several architectures."""

import copy
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

from fedsoda_cli.errors import ModelError
from fedsoda_cli.models.layers import decoder_layers, decoder_layers_path, drop_layers, residual_stream
from fedsoda_cli.models.load import load_causal_lm
from fedsoda_cli.models.tiny import TINY_QWEN2, build_tiny_random
from fedsoda_cli.spec.schema import ModelSpec

REMOVE = [1, 2, 4]
SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


class Skip(nn.Module):
    """Stands in for a removed decoder layer: passes the residual stream through unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _batch(vocab: int, pad_id: int):
    """Two left-padded prompts (generation needs left padding) of random tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = pad_id, 0
    return ids, mask


def _skipping_reference(model, remove):
    """A copy of the full model whose removed layers are identities."""
    reference = copy.deepcopy(model)
    for i in remove:
        reference.model.layers[i] = Skip()
    return reference


def _check_pruning(model, remove):
    pad_id = model.config.pad_token_id
    ids, mask = _batch(model.config.vocab_size, pad_id)
    reference = _skipping_reference(model, remove)
    n = model.config.num_hidden_layers

    kept = drop_layers(model, remove)

    assert kept == [i for i in range(n) if i not in remove]
    assert model.config.num_hidden_layers == len(decoder_layers(model)) == len(kept)
    for k, layer in enumerate(decoder_layers(model)):
        assert {sub.layer_idx for sub in layer.modules() if hasattr(sub, "layer_idx")} == {k}
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(got, expected)

    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad_id)
    cached = model.generate(**args, use_cache=True)
    uncached = model.generate(**args, use_cache=False)
    assert cached.shape == (2, 20)
    assert torch.equal(cached, uncached)
    return kept


def test_drop_layers_tiny(tiny):
    model, _ = tiny
    assert decoder_layers_path(model) == "model.layers"
    _check_pruning(model, REMOVE)


def test_drop_layers_slices_sliding_window_layer_types():
    """Qwen2 with sliding-window upper layers: layer_types must follow the kept layers, or the
    KV cache and masks of the pruned model would use the wrong window per layer."""
    _, tokenizer = load_causal_lm(ModelSpec(name=TINY_QWEN2))
    model = build_tiny_random(TINY_QWEN2, tokenizer, use_sliding_window=True, sliding_window=5, max_window_layers=2)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 4
    _check_pruning(model, [1, 3])
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]
    assert model.config.max_window_layers == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=5)),
        lambda: Gemma2ForCausalLM(Gemma2Config(**SHAPE, sliding_window=5)),
        lambda: Gemma3ForCausalLM(Gemma3TextConfig(**SHAPE, sliding_window=5)),
    ],
    ids=["mistral", "gemma2", "gemma3"],
)
def test_drop_layers_other_families(make):
    torch.manual_seed(0)
    model = make().eval()
    types_before = list(getattr(model.config, "layer_types", None) or [])
    kept = _check_pruning(model, REMOVE)
    if types_before:
        assert model.config.layer_types == [types_before[i] for i in kept]


def test_drop_layers_rejects_bad_indices(tiny):
    model, _ = tiny
    with pytest.raises(ModelError, match="out of range"):
        drop_layers(model, [6])
    with pytest.raises(ModelError, match="no model"):
        drop_layers(model, range(6))
    assert model.config.num_hidden_layers == 6


@contextmanager
def capture_residual_stream(model):
    """`residual_stream` collecting into {boundary l: hidden states}, each forward pass overwriting them."""
    captured = {}
    with residual_stream(model, lambda index, hidden: captured.__setitem__(index, hidden.detach())):
        yield captured


def test_capture_residual_stream_gives_every_boundary(tiny):
    model, tokenizer = tiny
    drop_layers(model, REMOVE)
    ids = tokenizer("Federated learning keeps data on the clients.", return_tensors="pt").input_ids
    with torch.no_grad(), capture_residual_stream(model) as h:
        logits = model(ids).logits
    k = len(decoder_layers(model))
    assert sorted(h) == list(range(k + 1))
    with torch.no_grad():
        assert torch.equal(h[0], model.model.embed_tokens(ids))
        assert torch.allclose(model.lm_head(model.model.norm(h[k])), logits, atol=1e-6)
        assert not torch.equal(h[1], h[0])
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in decoder_layers(model))


def test_residual_stream_sees_hidden_states_passed_by_keyword(tiny):
    model, _ = tiny
    seen = []
    x = torch.randn(1, 3, model.config.hidden_size)
    positions = torch.arange(3)[None]
    with torch.no_grad(), residual_stream(model, lambda i, h: seen.append((i, h)), final=False):
        decoder_layers(model)[2](
            hidden_states=x, attention_mask=None, position_ids=positions, position_embeddings=model.model.rotary_emb(x, positions)
        )
    assert len(seen) == 1 and seen[0][0] == 2 and seen[0][1] is x
