"""Realign: with the global adapter on both models, only the partial layers' base weights change;
the layers-only artifact equals a full re-quantization and swaps into a client model in place."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from fedsoda_cli.models import adapters, quantized
from fedsoda_cli.models.layers import drop_layers
from fedsoda_cli.models.load import load_causal_lm, save_checkpoint
from fedsoda_cli.oda import distill
from fedsoda_cli.oda.realign import apply_partial_layers, partial_layer_artifact, realign, write_partial_layers
from fedsoda_cli.spec.schema import AlignSpec, LoraSpec, ModelSpec, QuantizeSpec

GROUPS = [[2], [4]]
LORA = LoraSpec(r=4, alpha=8)
CONFIG = AlignSpec(lr=1e-2, logit_chunk=16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture()
def setup():
    """(teacher, student, tokenizer, kept, adapter state): the tiny llama, its copy without layers
    2 and 4, and a non-trivial global adapter of the sub-LLM."""
    teacher, tokenizer = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    student = copy.deepcopy(teacher)
    kept = drop_layers(student, [2, 4])
    carrier = adapters.attach_lora(copy.deepcopy(student), LORA)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in carrier.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return teacher, student, tokenizer, kept, adapters.adapter_state(carrier)


def batches():
    return distill.seeded_batches(torch.randint(0, 49152, (4, 12), generator=torch.Generator().manual_seed(2)), 2, seed=0)


def run_realign(teacher, student, kept, state, steps=2):
    return realign(teacher, student, state, kept, GROUPS, batches(), config=CONFIG, lora=LORA, steps=steps)


def test_only_partial_base_weights_change_and_the_adapter_does_not(setup):
    teacher, student, _, kept, state = setup
    adapter_before = {k: v.clone() for k, v in state.items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}

    result = run_realign(teacher, student, kept, state)

    partial = {f"model.layers.{k}." for k in distill.partial_layers(CONFIG.partial, kept, GROUPS)}
    after = student.state_dict()
    assert after.keys() == student_before.keys()  # the LoRA modules are gone again
    for key, value in student_before.items():
        changed = not torch.equal(value, after[key])
        assert changed == any(key.startswith(p) for p in partial), key
    assert teacher.state_dict().keys() == teacher_before.keys()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert all(torch.equal(v, state[k]) for k, v in adapter_before.items())
    assert result.partial_layer_state.keys() == {k for k in after if any(k.startswith(p) for p in partial)}
    assert all(torch.equal(v, after[k]) for k, v in result.partial_layer_state.items())
    assert result.metrics["partial_layers"] == [3, 5] and len(result.metrics["history"]) == 2


def test_the_adapter_is_attached_during_realignment(setup):
    """With the adapter on, the loss differs from the loss without it, so realign really sees it."""
    teacher, student, _, kept, state = setup
    with_adapter = run_realign(copy.deepcopy(teacher), copy.deepcopy(student), kept, state, steps=1)
    plain = distill.align_partial_layers(
        copy.deepcopy(teacher), copy.deepcopy(student), kept, GROUPS, CONFIG.partial, batches(), CONFIG, 1
    )
    assert with_adapter.metrics["history"][0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-6)


def test_realign_twice_reattaches_cleanly(setup):
    teacher, student, _, kept, state = setup
    run_realign(teacher, student, kept, state, steps=1)
    run_realign(teacher, student, kept, state, steps=1)
    assert not any("lora_" in n for n, _ in student.named_parameters())


def test_layers_only_artifact_equals_the_requantized_model_and_swaps_in(tmp_path, setup):
    teacher, student, tokenizer, kept, state = setup
    quant = QuantizeSpec()
    save_checkpoint(student, tokenizer, tmp_path / "old")
    old_client = quantized.quantize_checkpoint(tmp_path / "old", quant)

    result = run_realign(teacher, student, kept, state)
    nbytes = write_partial_layers(result.partial_layer_state, quant, tmp_path / "partial.safetensors")
    artifact = load_file(tmp_path / "partial.safetensors")
    assert nbytes == (tmp_path / "partial.safetensors").stat().st_size

    save_checkpoint(student, tokenizer, tmp_path / "new")
    new_client = quantized.quantize_checkpoint(tmp_path / "new", quant)
    new_state = quantized.client_state_dict(new_client)
    partial = tuple(f"model.layers.{k}." for k in (2, 3))
    assert artifact.keys() == {k for k in new_state if k.startswith(partial)}
    for key, value in artifact.items():
        assert torch.equal(value, new_state[key]), key

    touched = apply_partial_layers(old_client, tmp_path / "partial.safetensors")
    assert touched and all(t.startswith(partial) for t in touched)
    swapped = quantized.client_state_dict(old_client)
    assert swapped.keys() == new_state.keys()
    assert all(torch.equal(swapped[k], new_state[k]) for k in new_state)
    x = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        assert torch.equal(old_client(input_ids=x).logits, new_client(input_ids=x).logits)


def test_artifact_swaps_into_a_lora_wrapped_client_and_keeps_the_adapter(tmp_path, setup):
    teacher, student, tokenizer, kept, state = setup
    save_checkpoint(student, tokenizer, tmp_path / "sub")
    quantized.save_client_model(quantized.quantize_checkpoint(tmp_path / "sub", QuantizeSpec()), tokenizer, tmp_path / "client")
    client, _ = quantized.load_client_model(tmp_path / "client")
    client = adapters.attach_lora(client, LORA)
    adapters.load_adapter_state(client, state)
    result = run_realign(teacher, student, kept, state, steps=1)
    apply_partial_layers(client, partial_layer_artifact(result.partial_layer_state, QuantizeSpec()))
    assert all(torch.equal(v, adapters.adapter_state(client)[k]) for k, v in state.items())
    x = torch.randint(0, 1000, (1, 10))
    client(input_ids=x, labels=x).loss.backward()  # still trains


@pytest.mark.parametrize("quant_type", ["int8", "none"])
def test_other_formats_swap_in_exactly(tmp_path, setup, quant_type):
    teacher, student, tokenizer, kept, state = setup
    quant = QuantizeSpec(quant_type=quant_type)
    save_checkpoint(student, tokenizer, tmp_path / "old")
    old_client = quantized.quantize_checkpoint(tmp_path / "old", quant)
    x = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        old_client(input_ids=x)  # int8 moves its scales into the matmul state on first use
    result = run_realign(teacher, student, kept, state, steps=1)
    apply_partial_layers(old_client, partial_layer_artifact(result.partial_layer_state, quant))
    save_checkpoint(student, tokenizer, tmp_path / "new")
    new_client = quantized.quantize_checkpoint(tmp_path / "new", quant)
    with torch.no_grad():
        assert torch.equal(old_client(input_ids=x).logits, new_client(input_ids=x).logits)


def test_standalone_realign_writes_a_new_client_model(tmp_path):
    """profile -> prune -> align -> quantize on the tiny model, then the realign stage with an adapter."""
    from rich.console import Console

    from fedsoda_cli import pipeline
    from fedsoda_cli.spec.schema import Spec

    spec = Spec.model_validate(
        {
            "run": {"threads": 1},
            "model": {"name": "tiny-random-llama"},
            "public_data": {"sequences": 4, "seq_len": 16, "heldout_sequences": 2},
            "profile": {"max_span": 2},
            "prune": {"group_size": 1, "groups": 2},
            "align": {"steps": 1, "batch_size": 2},
            "realign": {"steps": 2},
        }
    )
    workdir, console = tmp_path / "run", Console(quiet=True)
    for name in ("profile", "prune", "align", "quantize"):
        pipeline.execute(spec, workdir, pipeline.stage_named(spec, name), console)
    old_bytes = (workdir / "quantize" / "model" / "model.safetensors").read_bytes()

    client, _ = quantized.load_client_model(workdir / "quantize" / "model")
    peft_client = adapters.attach_lora(client, LORA)
    with torch.no_grad():
        for name, p in peft_client.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    peft_client.save_pretrained(tmp_path / "adapter")

    manifest = pipeline.execute(spec, workdir, pipeline.REALIGN, console, adapter=tmp_path / "adapter")
    out = workdir / "realign"
    assert (workdir / "quantize" / "model" / "model.safetensors").read_bytes() == old_bytes
    assert {
        "model/model.safetensors",
        "partial_layers.safetensors",
        "partial_layers.float.safetensors",
        "layer_map.json",
        "metrics.jsonl",
    } <= set(manifest.outputs)
    assert manifest.metrics["partial_layers_bytes"] == (out / "partial_layers.safetensors").stat().st_size
    assert manifest.metrics["partial_layers_bytes"] < manifest.metrics["client_model_bytes"] / 5
    new_client, _ = quantized.load_client_model(out / "model")
    expected, _ = quantized.load_client_model(workdir / "quantize" / "model", prepare_for_training=False)
    apply_partial_layers(expected, out / "partial_layers.safetensors")
    x = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        assert torch.equal(new_client(input_ids=x).logits, expected(input_ids=x).logits)


def test_quant_aware_realign_measures_bf16_and_deployed_before_and_after(setup):
    teacher, student, _, kept, state = setup
    heldout = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(3))
    config = CONFIG.model_copy(update={"quant_aware": "ste"})
    result = realign(
        teacher,
        student,
        state,
        kept,
        GROUPS,
        batches(),
        config=config,
        lora=LORA,
        steps=2,
        heldout_ids=heldout,
        quant=QuantizeSpec(),
    )
    m = result.metrics
    assert set(m["measured"]) == {"before_bf16", "after_bf16", "deployed_before", "deployed_after"}
    assert all(set(v["hidden_nmse"]) == {"2", "4"} for v in m["measured"].values())
    assert m["before"] == m["measured"]["before_bf16"] and isinstance(m["warnings"], list)
    assert not any("lora_" in n for n, _ in student.named_parameters())


def test_bf16_partial_layers_travel_in_bf16_and_swap_into_a_client_that_keeps_them(tmp_path, setup):
    from fedsoda_cli.oda.realign import broadcast_format

    teacher, student, tokenizer, kept, state = setup
    config = CONFIG.model_copy(update={"quant_aware": "bf16_partial"})
    fmt = broadcast_format(config, QuantizeSpec())
    assert fmt.quant_type == "none" and broadcast_format(CONFIG, QuantizeSpec()).quant_type == "nf4"
    save_checkpoint(student, tokenizer, tmp_path / "old")
    client = quantized.quantize_checkpoint(tmp_path / "old", QuantizeSpec(), bf16_layers=[2, 3])
    result = realign(teacher, student, state, kept, GROUPS, batches(), config=config, lora=LORA, steps=1, quant=QuantizeSpec())
    artifact = partial_layer_artifact(result.partial_layer_state, fmt)
    assert {v.dtype for v in artifact.values()} == {torch.bfloat16}
    apply_partial_layers(client, artifact)
    expected = result.partial_layer_state["model.layers.2.mlp.up_proj.weight"].to(torch.bfloat16).float()
    assert torch.equal(client.model.layers[2].mlp.up_proj.weight, expected)
