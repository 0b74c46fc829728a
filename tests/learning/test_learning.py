"""Federated fine-tuning must raise the task metric, not just lower a loss: the whole pipeline
(profile, prune, align, NF4, federate in worker processes, eval) on the tiny random llama and a
synthetic task that can only be solved by reading the prompt.

The task: a prompt names one of 8 items; 4 of them are " red", 4 are " blue". An untrained
model scores near chance (the label words' prior decides), and a falling loss on the eos token alone
cannot pass. Both the client model (sub) and the full model with the mapped adapter (plugin) must
reach 90 %, under IID data and under a label-sorted partition where each client sees one label.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsoda_cli.cli.app import app

ITEMS = {" red": ["apple", "cherry", "ruby", "tomato"], " blue": ["ocean", "sky", "sapphire", "whale"]}

SPEC = """\
[run]
name = "learning"
seed = 0
threads = 2
workdir = "work"

[model]
name = "tiny-random-llama"

[public_data]
sequences = 4
seq_len = 32
heldout_sequences = 2

[profile]
max_span = 2

[prune]
group_size = 1
groups = 1

[align]
steps = 2
batch_size = 2

[lora]
r = 4
alpha = 8
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

[task]
name = "jsonl"
train_file = "train.jsonl"
eval_file = "eval.jsonl"
input_field = "item"
output_field = "color"
choices = [" red", " blue"]
prompt = "Item: {item}\\nColor:"
train_examples = 96
val_examples = 32
max_len = 32

[federate]
clients = 4
clients_per_round = 4
rounds = 10
workers = 2
local_steps = 6
batch_size = 8
lr = 0.01
realign_every = 0
eval_every = 5
eval_targets = ["sub", "plugin"]

[eval]
targets = ["plugin", "sub", "zero-shot"]
perplexity = false
batch_size = 32
"""


def write_task(folder: Path) -> None:
    rng = random.Random(0)
    rows = [{"item": item, "color": color} for color, items in ITEMS.items() for item in items]

    def sample(n):
        return "".join(json.dumps(rng.choice(rows)) + "\n" for _ in range(n))

    (folder / "train.jsonl").write_text(sample(160))
    (folder / "eval.jsonl").write_text(sample(64))


def run_pipeline(folder: Path, *overrides: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    write_task(folder)
    (folder / "spec.toml").write_text(SPEC)
    args = ["run", str(folder / "spec.toml")] + [a for o in overrides for a in ("--set", o)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    work = folder / "work"
    metrics = work / "federate" / "metrics.jsonl"  # the local method has one per client instead
    return {
        "results": json.loads((work / "eval" / "results.json").read_text()),
        "rounds": [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else [],
    }


@pytest.mark.parametrize(
    "overrides",
    [
        ("federate.partition=iid",),
        ("federate.partition=dirichlet", "federate.dirichlet_alpha=0.5", "federate.weighting=examples"),
    ],
    ids=["iid", "dirichlet-0.5"],
)
def test_federated_training_takes_both_targets_from_chance_to_90_percent(tmp_path, overrides):
    run = run_pipeline(tmp_path, *overrides)
    results, evals = run["results"], [r["eval"] for r in run["rounds"] if "eval" in r]
    assert [r["round"] for r in run["rounds"] if "eval" in r] == [5, 10]
    assert results["zero-shot"]["accuracy"] <= 0.7  # the untrained model cannot read the task
    for target in ("sub", "plugin"):
        assert results[target]["accuracy"] >= 0.9, (target, results, evals)
        assert evals[-1][target]["accuracy"] >= 0.9, evals
        assert evals[-1][target]["count"] == 32
        assert set(evals[-1][target]["label_shares"]) == {"red", "blue"}  # not one label for everything
        assert evals[-1][target]["loss"] < evals[0][target]["loss"]
