"""The baselines run end to end on the tiny model, each with its own definition of what clients hold."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from rich.console import Console
from safetensors import safe_open

from fedsoda_cli import pipeline
from fedsoda_cli.baselines.fedot import adapter_layers, dropped_middle_layers
from fedsoda_cli.errors import SpecError
from fedsoda_cli.spec import load_spec, resolve_workdir

REPO = Path(__file__).resolve().parents[2]

TINY = """\
[run]
name = "{method}"
method = "{method}"
workdir = "work-{method}"
threads = 1
[model]
name = "tiny-random-llama"
[public_data]
sequences = 4
seq_len = 16
heldout_sequences = 2
[profile]
max_span = 2
[prune]
group_size = 1
groups = 1
[align]
steps = 1
batch_size = 2
[quantize]
quant_type = "{quant}"
[lora]
r = 2
alpha = 4
[fedot]
adapter_layers = 1
drop_ratio = 0.5
[task]
name = "sst2"
train_examples = 16
eval_examples = 8
max_len = 48
[federate]
clients = 2
clients_per_round = 2
rounds = 2
workers = 1
local_steps = 1
batch_size = 2
realign_every = 1
[realign]
steps = 1
[eval]
targets = ["plugin", "zero-shot"]
perplexity = false
"""


def run_method(tmp_path: Path, method: str, quant: str = "none"):
    path = tmp_path / f"{method}.toml"
    path.write_text(TINY.format(method=method, quant=quant))
    spec = load_spec(path)
    workdir = resolve_workdir(spec)
    for stage in pipeline.stages_for(spec):
        pipeline.execute(spec, workdir, stage, Console(quiet=True))
    return spec, workdir


def adapter_layer_indices(workdir: Path) -> set[int]:
    with safe_open(workdir / "federate" / "adapter" / "adapter_model.safetensors", "pt") as handle:
        return {int(re.search(r"layers\.(\d+)\.", key).group(1)) for key in handle.keys()}


def test_fedpetuning_trains_every_layer_of_the_full_model_without_realignment(tmp_path):
    spec, workdir = run_method(tmp_path, "fedpetuning")
    assert [s.name for s in pipeline.stages_for(spec)] == ["base", "quantize", "federate", "eval"]
    layer_map = json.loads((workdir / "quantize" / "layer_map.json").read_text())
    assert layer_map["kept"] == list(range(layer_map["num_layers"])) and layer_map["removed_groups"] == []
    assert adapter_layer_indices(workdir) == set(range(layer_map["num_layers"]))
    summary = json.loads((workdir / "federate" / "summary.json").read_text())
    assert summary["bytes"].get("realign", 0) == 0
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert set(results) >= {"plugin", "zero-shot"} and results["plugin"]["count"] == 8


def test_fedot_drops_middle_layers_and_adapts_only_the_ends(tmp_path):
    spec, workdir = run_method(tmp_path, "fedot")
    layer_map = json.loads((workdir / "prune" / "layer_map.json").read_text())
    num_layers, kept = layer_map["num_layers"], layer_map["kept"]
    ends = adapter_layers(num_layers, 1)
    assert set(ends) <= set(kept)
    removed = [layer for group in layer_map["removed_groups"] for layer in group]
    assert removed == dropped_middle_layers(num_layers, 1, 0.5)
    align = json.loads((workdir / "align" / "manifest.json").read_text())["metrics"]
    assert sorted(align["partial_layers"]) == [layer for layer in kept if layer not in ends]
    # adapter modules live on the sub-LLM's first and last kept layers only
    assert adapter_layer_indices(workdir) == {kept.index(layer) for layer in ends}
    totals = json.loads((workdir / "federate" / "summary.json").read_text())["bytes"]
    assert totals.get("realign", 0) == 0


def test_fedsoda_quantized_client_is_smaller_than_fedpetuning(tmp_path):
    _, soda = run_method(tmp_path, "fedsoda", quant="nf4")
    _, petuning = run_method(tmp_path, "fedpetuning")
    assert client_model_bytes(soda) < client_model_bytes(petuning)


def client_model_bytes(workdir):
    return json.loads((workdir / "quantize" / "manifest.json").read_text())["metrics"]["client_model_bytes"]


@pytest.mark.parametrize("layers, k, ratio, expected", [(10, 2, 0.5, [3, 5, 7]), (30, 2, 0.35, None)])
def test_uniform_emulator_drop(layers, k, ratio, expected):
    dropped = dropped_middle_layers(layers, k, ratio)
    assert all(k <= layer < layers - k for layer in dropped)
    assert len(dropped) == round(ratio * (layers - 2 * k)) and dropped == sorted(set(dropped))
    if expected is not None:
        assert dropped == expected


def test_impossible_emulator_is_a_spec_error():
    with pytest.raises(SpecError, match="fedot.adapter_layers"):
        dropped_middle_layers(4, 2, 0.5)


BUDGET_KEYS = {
    "federate": ["clients", "clients_per_round", "rounds", "local_steps", "batch_size", "lr", "partition", "dirichlet_alpha"],
    "lora": ["r", "alpha"],
    "task": ["name", "train_examples", "eval_examples", "max_len"],
    "run": ["seed"],
}


@pytest.mark.parametrize("task", ["sst2", "boolq", "gsm8k"])
def test_shipped_specs_have_equal_budgets(task):
    specs = {m: tomllib.loads((REPO / "specs" / f"{task}-{m}.toml").read_text()) for m in ("fedsoda", "fedpetuning", "fedot")}
    for section, keys in BUDGET_KEYS.items():
        for key in keys:
            values = {m: s.get(section, {}).get(key) for m, s in specs.items()}
            assert len(set(map(str, values.values()))) == 1, f"{section}.{key} differs: {values}"
    assert {m: s["run"]["method"] for m, s in specs.items()} == {m: m for m in specs}
