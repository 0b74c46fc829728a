"""The float emulation of the client model (models/fakequant.py) against bitsandbytes: the same
NF4 values on a tiny tensor, the same logits as the quantized client, floats restored on exit, and
the straight-through gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from fedsoda_cli.models import fakequant, quantized
from fedsoda_cli.models.layers import drop_layers
from fedsoda_cli.models.load import load_causal_lm, save_checkpoint
from fedsoda_cli.spec.schema import ModelSpec, QuantizeSpec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sub(tmp_path_factory):
    """(folder, model, tokenizer): the tiny llama without layers 2 and 4, saved as a float checkpoint."""
    model, tokenizer = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    drop_layers(model, [2, 4])
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("sub") / "model"), model, tokenizer


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_fake_quantize_equals_the_bitsandbytes_weight(quant_type, double_quant):
    import bitsandbytes as bnb

    w = torch.randn(8, 200, generator=torch.Generator().manual_seed(0)) * 0.05  # 1600 = 25 blocks of 64
    p = bnb.nn.Params4bit(
        w.clone(),
        requires_grad=False,
        blocksize=64,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=torch.uint8,
    ).to("cpu")
    reference = bnb.functional.dequantize_4bit(p.data, p.quant_state)
    fake = fakequant.fake_quantize(w, QuantizeSpec(quant_type=quant_type, double_quant=double_quant))
    assert torch.equal(fake, reference)
    codes = bnb.functional.get_4bit_type(quant_type, device="cpu").float()
    absmax = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    if not double_quant:  # every value is a codebook value times its block's absmax
        ratio = fake.reshape(-1, 64) / absmax
        assert torch.isclose(ratio.unsqueeze(-1), codes.view(1, 1, -1), atol=1e-6).any(-1).all()


@pytest.mark.parametrize(
    "quant",
    [
        QuantizeSpec(),
        QuantizeSpec(quant_type="fp4"),
        QuantizeSpec(double_quant=False),
        QuantizeSpec(embeddings="int8"),
        QuantizeSpec(quant_type="none"),
    ],
)
def test_deployed_view_gives_the_client_logits_and_restores_the_floats(sub, quant):
    folder, model, _ = sub
    client = quantized.quantize_checkpoint(folder, quant)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with fakequant.deployed(model, quant):
            emulated = model(input_ids=x).logits
        assert torch.equal(emulated, client(input_ids=x).logits)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_layers_kept_in_bf16_match_a_client_that_skips_them(tmp_path, sub):
    folder, model, tokenizer = sub
    client = quantized.quantize_checkpoint(folder, QuantizeSpec(), bf16_layers=[2])
    assert type(client.model.layers[2].mlp.up_proj) is torch.nn.Linear
    assert type(client.model.layers[1].mlp.up_proj) is not torch.nn.Linear
    quantized.save_client_model(client, tokenizer, tmp_path / "client")
    reloaded, _ = quantized.load_client_model(tmp_path / "client", prepare_for_training=False)
    assert type(reloaded.model.layers[2].mlp.up_proj) is torch.nn.Linear
    x = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        with fakequant.deployed(model, QuantizeSpec(), bf16=[2]):
            emulated = model(input_ids=x).logits
        assert torch.equal(emulated, reloaded(input_ids=x).logits)


def test_ste_forwards_quantized_weights_and_passes_the_gradient_to_the_float_master(sub):
    _, model, _ = sub
    student = copy.deepcopy(model)
    quant = QuantizeSpec()
    x = torch.randint(0, 1000, (1, 10))
    with torch.no_grad(), fakequant.deployed(student, quant):
        deployed_logits = student(input_ids=x).logits
    master = student.model.layers[2].mlp.up_proj.weight
    original = master.detach().clone()
    with fakequant.deployed(student, quant, trainable=[2], ste=True):
        logits = student(input_ids=x).logits
        logits.square().mean().backward()
    assert torch.allclose(logits.detach(), deployed_logits, atol=1e-5)  # layer 2 computed in NF4 too
    assert master.grad is not None and master.grad.abs().sum() > 0
    assert torch.equal(master.detach(), original)  # the master stays float, not its quantized value
    assert "forward" not in vars(student.model.layers[2].mlp.up_proj)  # the patch is gone
