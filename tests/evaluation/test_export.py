"""Export round trip: the merged checkpoint, loaded by stock transformers, gives the logits of the
full model + plugin adapter through stock PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from fedsoda_cli import artifacts
from fedsoda_cli.errors import ArtifactError
from fedsoda_cli.export import PROVENANCE, export_merged
from fedsoda_cli.federated.client import lora_config
from fedsoda_cli.models.layers import drop_layers
from fedsoda_cli.models.load import load_causal_lm
from fedsoda_cli.spec import Spec
from tests.stage_folders import write_stage_folder


def _spec(**task) -> Spec:
    return Spec.model_validate({"model": {"name": "tiny-random-llama"}, "lora": {"r": 4, "alpha": 8}, "task": task})


def _federated_run(workdir, spec):
    """profile/prune/align/quantize placeholders (quantize holds the layer map) and a federate adapter."""
    sub, _ = load_causal_lm(spec.model)
    kept = drop_layers(sub, [1, 2])

    def quantize(out):
        (out / "layer_map.json").write_text(json.dumps({"kept": kept, "removed_groups": [[1, 2]], "num_layers": 6}))

    def federate(out):
        torch.manual_seed(5)
        peft = get_peft_model(sub, lora_config(spec.lora))
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        peft.save_pretrained(out / "adapter")

    for name in ("profile", "prune", "align"):
        write_stage_folder(workdir, spec, name)
    write_stage_folder(workdir, spec, "quantize", quantize)
    write_stage_folder(workdir, spec, "federate", federate)


def test_merged_export_loads_with_stock_transformers_and_matches_peft(tmp_path):
    torch.set_num_threads(1)
    spec = _spec()
    workdir = tmp_path / "run"
    _federated_run(workdir, spec)
    out = export_merged(spec, workdir, tmp_path / "export")

    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / PROVENANCE).read_text())["federate_digest"] == artifacts.read_manifest(workdir, "federate").digest()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())

    # the reference: stock PEFT on the plugin adapter, written here through the eval stage's code
    from fedsoda_cli.evaluation.targets import write_plugin_adapter
    from fedsoda_cli.models.layer_map import LayerMap

    layer_map = json.loads((workdir / "quantize" / "layer_map.json").read_text())
    plugin = write_plugin_adapter(
        workdir / "federate" / "adapter", LayerMap(layer_map["kept"], 6), "model.layers", tmp_path / "plugin"
    )
    full, _ = load_causal_lm(spec.model)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(full, str(plugin))(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base = load_causal_lm(spec.model)[0](input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)


def test_export_merges_at_the_plug_in_scale_eval_uses(tmp_path):
    """eval.plugin_scale = s: the merged weights move s times as far from the full model's as at s = 1,
    and the provenance says which s; for "val" the export takes the scale eval chose, or refuses."""
    torch.set_num_threads(1)
    spec = _spec(train_examples=20, val_examples=4)
    workdir = tmp_path / "run"
    _federated_run(workdir, spec)
    whole = AutoModelForCausalLM.from_pretrained(export_merged(spec, workdir, tmp_path / "s1")).state_dict()
    spec.eval.plugin_scale = 0.5
    out = export_merged(spec, workdir, tmp_path / "s05")
    half = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = load_causal_lm(spec.model)[0].state_dict()
    assert json.loads((out / PROVENANCE).read_text())["plugin_scale"] == 0.5
    moved = [k for k in base if not torch.equal(whole[k], base[k])]
    assert moved and all(".self_attn." in k for k in moved)
    for key in moved:
        assert torch.allclose(half[key] - base[key], 0.5 * (whole[key] - base[key]), atol=1e-6)

    spec.eval.plugin_scale = "val"  # eval reads [eval], federate only two keys of it: federate stays current
    with pytest.raises(ArtifactError, match="'eval' has not run"):
        export_merged(spec, workdir, tmp_path / "val")

    # "val": the scale the current eval chose (its plugin_scale.json, as the eval stage writes it)
    from fedsoda_cli.evaluation.plugin_scale import Candidate, ScaleChoice
    from fedsoda_cli.stages.eval import PLUGIN_ADAPTER, PLUGIN_SCALE

    choice = ScaleChoice(0.5, "val", [Candidate(0.5, 0.9, 9, 10, 0.2), Candidate(1.0, 0.8, 8, 10, 0.3)])

    def eval_stage(out):
        (out / PLUGIN_ADAPTER).mkdir()
        (out / PLUGIN_ADAPTER / PLUGIN_SCALE).write_text(json.dumps(choice.to_json()))

    write_stage_folder(workdir, spec, "eval", eval_stage)
    out = export_merged(spec, workdir, tmp_path / "val")
    assert json.loads((out / PROVENANCE).read_text())["plugin_scale"] == 0.5
    chosen = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(chosen[key], half[key]) for key in moved)
    write_stage_folder(workdir, spec, "eval")  # an eval that scored no plugin target chose nothing
    with pytest.raises(ArtifactError, match='eval.plugin_scale = "val" but eval recorded no chosen scale'):
        export_merged(spec, workdir, tmp_path / "val")


def test_export_refuses_a_run_without_federate(tmp_path):
    with pytest.raises(ArtifactError, match="'federate' has not run"):
        export_merged(_spec(), tmp_path / "nothing", tmp_path / "export")
