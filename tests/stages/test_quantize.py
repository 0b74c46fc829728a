"""The client model: NF4/FP4/int8 quantization of the decoder layers, save and reload (same
logits), bytes on disk, int8 embeddings, LoRA on top, and the quantize stage, on the tiny llama."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from fedsoda_cli.models import quantized
from fedsoda_cli.models.layers import drop_layers
from fedsoda_cli.models.load import load_causal_lm, save_checkpoint
from fedsoda_cli.spec.schema import ModelSpec, QuantizeSpec

REMOVED = [2, 3]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def float_sub(tmp_path_factory):
    """(folder, model, tokenizer): the tiny llama without layers 2 and 3, saved as a float checkpoint."""
    model, tokenizer = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    drop_layers(model, REMOVED)
    folder = save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("sub") / "model")
    return folder, model, tokenizer


def ids(seed=0):
    return torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize(
    "quant_type, embeddings", [("nf4", "bf16"), ("fp4", "bf16"), ("int8", "bf16"), ("none", "bf16"), ("nf4", "int8")]
)
def test_reload_gives_the_same_logits(tmp_path, float_sub, quant_type, embeddings):
    folder, float_model, tokenizer = float_sub
    client = quantized.quantize_checkpoint(folder, QuantizeSpec(quant_type=quant_type, embeddings=embeddings))
    x = ids()
    before = logits(client, x)
    quantized.save_client_model(client, tokenizer, tmp_path / "client")
    reloaded, _ = quantized.load_client_model(tmp_path / "client")
    assert torch.equal(before, logits(reloaded, x))
    # quantized, but still the same model: close to the float logits, and not identical for 4-bit
    reference = logits(float_model, x)
    gap = (before - reference).abs().max().item()
    assert gap < 1.0
    if quant_type in ("nf4", "fp4"):
        assert gap > 0


def test_logits_do_not_depend_on_grad_mode_or_a_resave(tmp_path, float_sub):
    """bnb's bf16-packed CPU path is off: eval without grad == training forward, and saving after
    inference writes the same constants."""
    folder, _, tokenizer = float_sub
    client = quantized.quantize_checkpoint(folder, QuantizeSpec())
    x = ids(1)
    no_grad = logits(client, x)
    client.train()
    with_grad = client(input_ids=x).logits.detach()
    client.eval()
    assert torch.equal(no_grad, with_grad)
    quantized.save_client_model(client, tokenizer, tmp_path / "a")
    again, _ = quantized.load_client_model(tmp_path / "a", prepare_for_training=False)
    assert {p.dtype for n, p in again.named_parameters() if "layers" not in n or "norm" in n} == {torch.float32}
    logits(again, x)
    quantized.save_client_model(again, tokenizer, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_nf4_bytes_match_the_bits_per_weight(tmp_path, float_sub):
    """Weights file = 4 bits per quantized weight + one 8-bit absmax per 64 weights (double quant)
    + per-tensor constants, and 2 bytes per other weight (tied embedding once)."""
    folder, float_model, tokenizer = float_sub
    client = quantized.quantize_checkpoint(folder, QuantizeSpec(quant_type="nf4", double_quant=True))
    quantized.save_client_model(client, tokenizer, tmp_path / "client")
    file = tmp_path / "client" / "model.safetensors"

    linear = [
        m.weight.numel() for name, m in float_model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name
    ]
    other = sum(p.numel() for n, p in float_model.named_parameters() if not (n.endswith("proj.weight") and ".layers." in n))
    payload = sum(n / 2 + n / 64 for n in linear) + 2 * other
    # per quantized tensor: quant_map (16 fp32), nested_quant_map (256 fp32), nested_absmax,
    # the quant_state JSON blob and ~6 header entries; bounded well below 4 KiB
    slack = 4096 * len(linear) + 4096
    assert payload <= file.stat().st_size <= payload + slack
    with safe_open(file, "pt") as f:
        keys = list(f.keys())
    assert "lm_head.weight" not in keys  # tied to the embedding: stored once
    assert any(k.endswith("quant_state.bitsandbytes__nf4") for k in keys)
    with safe_open(file, "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"


def test_int8_embeddings_store_one_byte_per_value(tmp_path, float_sub):
    folder, float_model, tokenizer = float_sub
    client = quantized.quantize_checkpoint(folder, QuantizeSpec(embeddings="int8"))
    quantized.save_client_model(client, tokenizer, tmp_path / "client")
    vocab, hidden = float_model.get_input_embeddings().weight.shape
    extra = (tmp_path / "client" / quantized.EMBEDDINGS_INT8).stat().st_size
    assert vocab * hidden + 4 * vocab <= extra <= vocab * hidden + 4 * vocab + 1024
    with safe_open(tmp_path / "client" / "model.safetensors", "pt") as f:
        assert "model.embed_tokens.weight" not in f.keys()
    reloaded, _ = quantized.load_client_model(tmp_path / "client")
    emb = reloaded.get_input_embeddings().weight
    assert reloaded.get_output_embeddings().weight is emb
    err = (emb - float_model.get_input_embeddings().weight).abs().max(dim=1).values
    assert torch.all(err <= float_model.get_input_embeddings().weight.abs().max(dim=1).values / 127 * 0.51 + 1e-6)


def test_int8_rows_are_stable_under_requantization():
    w = torch.randn(20000, 64, generator=torch.Generator().manual_seed(0)) * torch.rand(20000, 1) * 0.1
    w[5] = 0  # a padding row
    q, scale = quantized.int8_rows(w)
    q2, scale2 = quantized.int8_rows(q.float() * scale[:, None])
    assert torch.equal(q, q2) and torch.equal(scale, scale2)
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] * 0.5001)


def test_loaded_client_model_trains_lora_only(tmp_path, float_sub):
    from fedsoda_cli.models.adapters import attach_lora
    from fedsoda_cli.spec.schema import LoraSpec

    folder, _, tokenizer = float_sub
    quantized.save_client_model(quantized.quantize_checkpoint(folder, QuantizeSpec()), tokenizer, tmp_path / "client")
    model, _ = quantized.load_client_model(tmp_path / "client")
    peft_model = attach_lora(model, LoraSpec(r=4, alpha=8))
    for module in peft_model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    x = ids(2)
    loss = peft_model(input_ids=x, labels=x).loss
    loss.backward()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


def test_a_folder_without_client_model_files_is_a_model_error(tmp_path):
    from fedsoda_cli.errors import ModelError

    with pytest.raises(ModelError, match="fedsoda quantize"):
        quantized.load_client_model(tmp_path)


def test_quantize_stage_reports_bytes_and_perplexity(tmp_path, float_sub):
    from rich.console import Console

    from fedsoda_cli.pipeline import StageContext
    from fedsoda_cli.spec.schema import Spec
    from fedsoda_cli.stages import quantize

    folder, float_model, _ = float_sub
    align_dir = folder.parent
    (align_dir / "layer_map.json").write_text(
        json.dumps({"kept": [0, 1, 4, 5], "removed_groups": [REMOVED], "num_layers": 6, "strategy": "sgp"})
    )
    spec = Spec.model_validate({"model": {"name": "tiny-random-llama"}, "public_data": {"heldout_sequences": 2, "seq_len": 16}})
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(spec=spec, workdir=tmp_path, out=out, inputs={"align": align_dir}, console=Console(quiet=True))
    result = quantize.run(ctx)

    m = result.metrics
    full, _ = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    assert m["params_full"] == sum(p.numel() for p in full.parameters())
    assert m["params_sub"] == sum(p.numel() for p in float_model.parameters())
    assert m["full_model_bf16_bytes"] == 2 * m["params_full"]
    assert m["client_model_bytes"] == quantized.folder_bytes(out / "model")
    assert m["client_weight_bytes"] < m["sub_model_bf16_bytes"] < m["full_model_bf16_bytes"]
    assert math.isfinite(m["heldout_ppl_sub_quantized"]) and math.isfinite(m["heldout_ppl_sub_bf16"])
    assert (out / "layer_map.json").is_file()
    quantized.load_client_model(out / "model")


def test_the_sub_target_loader_without_an_adapter_is_the_client_model_as_received(tmp_path, float_sub):
    """bench/client_zero_shot.py scores the client model before training with the sub target's loader."""
    from fedsoda_cli.evaluation.targets import load_sub

    folder, _, tokenizer = float_sub
    client = quantized.quantize_checkpoint(folder, QuantizeSpec())
    x = ids(2)
    expected = logits(client, x)
    quantized.save_client_model(client, tokenizer, tmp_path / "client")
    model, _ = load_sub(tmp_path / "client", adapter_dir=None)
    assert not model.training
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert torch.equal(logits(model, x), expected)
