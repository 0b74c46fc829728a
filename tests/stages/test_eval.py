"""The eval stage end to end on a tiny run: a pruned tiny llama quantized to NF4 as the client model,
a trained-looking LoRA adapter as federate's output, run through `pipeline.execute`."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from rich.console import Console

from fedsoda_cli import pipeline
from fedsoda_cli.data.paths import resolve_data_dir
from fedsoda_cli.data.tasks import load_task
from fedsoda_cli.errors import ArtifactError
from fedsoda_cli.evaluation.scoring import label_word_logprobs
from fedsoda_cli.evaluation.targets import plugin_model
from fedsoda_cli.evaluation.task import evaluate_task
from fedsoda_cli.federated.client import lora_config
from fedsoda_cli.models.layer_map import LayerMap
from fedsoda_cli.models.layers import drop_layers
from fedsoda_cli.models.load import load_causal_lm, save_checkpoint
from fedsoda_cli.models.quantized import quantize_checkpoint, save_client_model
from fedsoda_cli.spec import Spec
from fedsoda_cli.stages.eval import PREDICTIONS, RESULTS
from tests.stage_folders import write_stage_folder

REMOVED = [2, 3]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_dir():
    found = resolve_data_dir(Spec().data, None)
    if found is None or not (found / "sst2" / "dev.jsonl").is_file():
        pytest.skip("../shared/data is not available")
    return found


def _spec(**task) -> Spec:
    return Spec.model_validate(
        {
            "model": {"name": "tiny-random-llama"},
            "task": {"name": "sst2", "eval_examples": 6, **task},
            "lora": {"r": 4, "alpha": 8},
            "public_data": {"heldout_sequences": 2, "seq_len": 16},
            "eval": {"batch_size": 4, "max_new_tokens": 8},
        }
    )


def _fake_run(workdir, spec):
    """profile/prune/align placeholders, a real quantize folder and a real federate adapter."""
    sub, tokenizer = load_causal_lm(spec.model)
    kept = drop_layers(sub, REMOVED)
    layer_map = {"kept": kept, "removed_groups": [REMOVED], "num_layers": 6, "strategy": "sgp"}
    float_dir = save_checkpoint(sub, tokenizer, workdir.parent / "float-sub")

    def quantize(out):
        client = quantize_checkpoint(float_dir, spec.quantize)
        save_client_model(client, tokenizer, out / "model")
        (out / "layer_map.json").write_text(json.dumps(layer_map))

    def federate(out):
        torch.manual_seed(3)
        peft = get_peft_model(sub, lora_config(spec.lora))
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        peft.save_pretrained(out / "adapter")
        (out / "summary.json").write_text("{}")

    for name in ("profile", "prune", "align"):
        write_stage_folder(workdir, spec, name)
    write_stage_folder(workdir, spec, "quantize", quantize)
    write_stage_folder(workdir, spec, "federate", federate)
    return kept


def test_eval_stage_writes_results_and_predictions_for_every_target(tmp_path, data_dir):
    spec = _spec()
    workdir = tmp_path / "run"
    _fake_run(workdir, spec)
    console = Console(record=True, width=160)
    manifest = pipeline.execute(spec, workdir, pipeline.stage_named(spec, "eval"), console)
    out = workdir / "eval"

    results = json.loads((out / RESULTS).read_text())
    assert list(results) == ["plugin", "sub", "zero-shot"]
    for r in results.values():
        assert r["task"] == "sst2" and r["count"] == 6 and 0 <= r["correct"] <= 6
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        assert r["perplexity"] > 1 and r["perplexity_tokens"] == 2 * 15
    lines = [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]
    assert len(lines) == 3 * 6
    assert {tuple(sorted(line)) for line in lines} == {("correct", "gold", "id", "prediction", "scores", "target")}
    assert sum(line["correct"] for line in lines if line["target"] == "sub") == results["sub"]["correct"]
    assert manifest.metrics["accuracy"] == {t: r["accuracy"] for t, r in results.items()}
    # each trained target against zero-shot, paired on the same examples of predictions.jsonl
    right = {t: {line["id"]: line["correct"] for line in lines if line["target"] == t} for t in results}
    assert "vs_zero_shot" not in results["zero-shot"]
    for target in ("plugin", "sub"):
        paired = results[target]["vs_zero_shot"]
        won = sum(right[target][i] and not right["zero-shot"][i] for i in right[target])
        lost = sum(right["zero-shot"][i] and not right[target][i] for i in right[target])
        assert (paired["count"], paired["only_a"], paired["only_b"]) == (6, won, lost)
        assert paired["difference"] == pytest.approx(results[target]["accuracy"] - results["zero-shot"]["accuracy"])
        assert paired["ci95"][0] <= paired["difference"] <= paired["ci95"][1]
    shown = console.export_text()
    assert "plugin - zero-shot" in shown and "sub - zero-shot" in shown and "McNemar p" in shown

    # Independent of the stage: stock peft on the written plugin folder, and the bare full model.
    examples = load_task(spec.task, data_dir, "eval", spec.run.seed)
    full, tokenizer = load_causal_lm(spec.model)
    zero_shot = label_word_logprobs(full, tokenizer, examples, max_len=spec.task.max_len, batch_size=1)
    plugin = label_word_logprobs(
        PeftModel.from_pretrained(full, str(out / "plugin_adapter")), tokenizer, examples, max_len=spec.task.max_len, batch_size=1
    )
    by_target = {t: [line["scores"] for line in lines if line["target"] == t] for t in results}
    assert torch.allclose(torch.tensor(by_target["zero-shot"]), torch.tensor(zero_shot), atol=1e-4)
    assert torch.allclose(torch.tensor(by_target["plugin"]), torch.tensor(plugin), atol=1e-4)
    assert not torch.allclose(torch.tensor(by_target["plugin"]), torch.tensor(zero_shot), atol=1e-3)


def test_the_in_memory_plugin_model_matches_the_stage_plugin_target(tmp_path, data_dir):
    """What federate's per-round evaluator scores (plugin_model on an in-memory adapter) is what
    the eval stage scores from the adapter folder."""
    spec = _spec(eval_examples=4)
    spec.eval.targets = ["plugin"]
    spec.eval.perplexity = False
    workdir = tmp_path / "run"
    kept = _fake_run(workdir, spec)
    pipeline.execute(spec, workdir, pipeline.stage_named(spec, "eval"), Console(record=True))
    stage_result = json.loads((workdir / "eval" / RESULTS).read_text())["plugin"]

    from safetensors.torch import load_file

    adapter = load_file(workdir / "federate" / "adapter" / "adapter_model.safetensors")
    # PEFT saves names without the adapter name; per-round callers hold get_peft_model_state_dict's, the same.
    full, tokenizer = load_causal_lm(spec.model)
    examples = load_task(spec.task, data_dir, "eval", spec.run.seed)
    with plugin_model(full, adapter, lora_config(spec.lora), LayerMap(kept, 6)) as model:
        score = evaluate_task(
            model,
            tokenizer,
            spec.task.name,
            examples,
            batch_size=spec.eval.batch_size,
            max_len=spec.task.max_len,
            max_new_tokens=spec.eval.max_new_tokens,
        )
    assert score.summary() == {k: stage_result[k] for k in score.summary()}
    assert not any("lora" in name for name, _ in full.named_modules())


def test_eval_without_quantize_output_names_the_missing_stage(tmp_path, data_dir):
    spec = _spec()
    workdir = tmp_path / "run"
    _fake_run(workdir, spec)
    # quantize's files are gone but federate is still current: the stage must say what to rerun
    (workdir / "quantize" / "layer_map.json").write_text("{}")
    with pytest.raises(ArtifactError, match="quantize"):
        pipeline.execute(spec, workdir, pipeline.stage_named(spec, "eval"), Console(record=True))


def test_plugin_scale_val_chooses_on_the_validation_slice_and_writes_the_scaled_adapter(tmp_path, data_dir):
    """eval.plugin_scale = "val": every candidate is scored on the validation slice (not the eval
    split), the best by accuracy (then loss) is the one the plugin folder carries, and that folder,
    read by stock peft, is the scale-1 mapping with B multiplied by it."""
    from safetensors.torch import load_file

    from fedsoda_cli.evaluation.plugin_scale import Candidate, best
    from fedsoda_cli.evaluation.targets import write_plugin_adapter
    from fedsoda_cli.stages.eval import PLUGIN_SCALE

    spec = _spec(train_examples=30, val_examples=8)
    spec.eval.targets = ["plugin", "zero-shot"]
    spec.eval.perplexity = False
    spec.eval.plugin_scale = "val"
    spec.eval.plugin_scales = [0.25, 1.0]
    workdir = tmp_path / "run"
    kept = _fake_run(workdir, spec)
    console = Console(record=True, width=200)
    pipeline.execute(spec, workdir, pipeline.stage_named(spec, "eval"), console)
    out = workdir / "eval"
    choice = json.loads((out / RESULTS).read_text())["plugin"]["plugin_scale"]
    assert choice == json.loads((out / "plugin_adapter" / PLUGIN_SCALE).read_text())
    assert choice["chosen_on"] == "val" and [c["scale"] for c in choice["candidates"]] == [0.25, 1.0]
    assert choice["scale"] == best([Candidate(**c) for c in choice["candidates"]]).scale
    assert "chosen on 8 validation examples" in console.export_text()

    # Independently: each candidate's score is stock peft on the scaled folder over the validation slice.
    val = load_task(spec.task, data_dir, "val", spec.run.seed)
    assert not {e.id for e in val} & {e.id for e in load_task(spec.task, data_dir, "eval", spec.run.seed)}
    full, tokenizer = load_causal_lm(spec.model)
    unscaled = write_plugin_adapter(workdir / "federate" / "adapter", LayerMap(kept, 6), "model.layers", tmp_path / "s1")
    for candidate in choice["candidates"]:
        folder = write_plugin_adapter(
            workdir / "federate" / "adapter",
            LayerMap(kept, 6),
            "model.layers",
            tmp_path / f"s{candidate['scale']}",
            scale=candidate["scale"],
        )
        model = PeftModel.from_pretrained(full, str(folder)).eval()
        score = evaluate_task(model, tokenizer, "sst2", val, batch_size=4, max_len=spec.task.max_len, max_new_tokens=8)
        assert (score.correct, score.count) == (candidate["correct"], candidate["count"])
        assert score.label_word_loss(val) == pytest.approx(candidate["loss"], abs=1e-5)
        model.unload()
    written, reference = (
        load_file(out / "plugin_adapter" / "adapter_model.safetensors"),
        load_file(unscaled / "adapter_model.safetensors"),
    )
    for key, value in reference.items():
        factor = choice["scale"] if "lora_B" in key else 1.0
        assert torch.allclose(written[key], factor * value)


def test_best_plug_in_scale_breaks_ties_by_loss_then_by_the_larger_scale():
    from fedsoda_cli.evaluation.plugin_scale import Candidate, best

    assert best([Candidate(0.5, 0.8, 8, 10, 0.4), Candidate(1.0, 0.7, 7, 10, 0.1)]).scale == 0.5
    assert best([Candidate(0.5, 0.8, 8, 10, 0.4), Candidate(1.0, 0.8, 8, 10, 0.5)]).scale == 0.5
    assert best([Candidate(0.5, 0.8, 8, 10, None), Candidate(1.0, 0.8, 8, 10, None)]).scale == 1.0


def test_bad_plugin_scales_are_spec_errors():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs task.val_examples > 0"):
        Spec.model_validate({"task": {"val_examples": 0}, "eval": {"plugin_scale": "val"}})
    with pytest.raises(ValidationError, match='"val" needs task.train_examples > 0'):
        Spec.model_validate({"task": {"train_examples": 0}, "eval": {"plugin_scale": "val"}})
    # only the plugin target reads the scale
    assert Spec.model_validate({"task": {"train_examples": 0}, "eval": {"plugin_scale": "val", "targets": ["sub"]}})
    for bad in (0, 5, True, "half"):
        with pytest.raises(ValidationError, match=r'plugin_scale must be a number in \(0, 4\] or "val", got'):
            Spec.model_validate({"eval": {"plugin_scale": bad}})
    assert Spec.model_validate({"eval": {"plugin_scale": 1}}).eval.plugin_scale == 1.0
