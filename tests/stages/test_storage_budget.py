"""prune.storage_budget end to end on the tiny llama: prune removes the fewest layers whose
predicted client model fits, quantize writes a client model within the budget, and the prediction
is an upper bound that is close to what is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsoda_cli.models.load import load_causal_lm
from fedsoda_cli.models.storage import predict_client_bytes
from fedsoda_cli.spec.schema import ModelSpec, QuantizeSpec

SPEC = """
[run]
workdir = "run"
threads = 1
[model]
name = "tiny-random-llama"
[public_data]
sequences = 4
seq_len = 32
heldout_sequences = 2
[profile]
max_span = 3
batch_size = 2
[prune]
storage_budget = {budget}
[align]
steps = 2
batch_size = 2
[quantize]
embeddings = "{embeddings}"
"""


def fedsoda(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedsoda_cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.parametrize("embeddings", ["bf16", "int8"])
def test_budget_prunes_to_fit_and_quantize_stays_within_it(tmp_path, embeddings):
    model, tokenizer = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    prediction = predict_client_bytes(model, tokenizer, QuantizeSpec(embeddings=embeddings), tmp_path)
    assert not list(tmp_path.iterdir())  # its scratch folder is gone again
    layers = 6
    budget = prediction.bytes_with(layers - 2) + prediction.per_layer // 2  # two layers must go, a third need not
    (tmp_path / "spec.toml").write_text(SPEC.format(budget=budget, embeddings=embeddings))
    done = fedsoda("run", "spec.toml", "--to", "quantize", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr

    layer_map = json.loads((tmp_path / "run" / "prune" / "layer_map.json").read_text())
    removed = [layer for g in layer_map["removed_groups"] for layer in g]
    assert 2 <= len(removed) <= 2 + 3 - 1 and 0 not in removed and layers - 1 not in removed
    record = json.loads((tmp_path / "run" / "quantize" / "manifest.json").read_text())["metrics"]["storage_budget"]
    actual = record["actual_client_bytes"]
    assert record["budget_bytes"] == budget and record["within_budget"] is True
    assert actual <= record["predicted_client_bytes"] <= budget
    assert record["predicted_client_bytes"] <= 1.05 * actual  # an upper bound, not a wild one
    assert "storage budget" in done.stdout


def test_a_changed_client_precision_makes_the_budgeted_prune_stale(tmp_path):
    """prune chose its blocks by the bytes the quantize section predicts, so a changed quantize
    section must send `run` back to prune, not leave a choice made for another precision."""
    (tmp_path / "spec.toml").write_text(SPEC.format(budget=10**9, embeddings="bf16"))  # bytes: fits whole
    done = fedsoda("run", "spec.toml", "--to", "prune", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    status = fedsoda("status", "spec.toml", "--set", 'quantize.embeddings="int8"', cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    prune_line = next(line for line in status.stdout.splitlines() if "prune" in line)
    assert "stale" in prune_line


def test_a_budget_no_pruning_can_meet_is_one_line(tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC.format(budget=1000, embeddings="bf16"))
    done = fedsoda("run", "spec.toml", "--to", "prune", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "prune.storage_budget" in done.stdout + done.stderr and "Traceback" not in done.stdout + done.stderr


def test_budget_with_another_strategy_is_refused_at_validate(tmp_path):
    (tmp_path / "spec.toml").write_text(
        SPEC.format(budget=0.5, embeddings="bf16").replace("[prune]", '[prune]\nstrategy = "uniform"')
    )
    done = fedsoda("validate", "spec.toml", cwd=tmp_path)
    assert done.returncode == 2 and "prune.storage_budget" in done.stdout + done.stderr


def test_rerank_picks_the_lowest_perplexity_block_among_the_top_k(tmp_path):
    import torch

    from fedsoda_cli.evaluation.perplexity import perplexity
    from fedsoda_cli.models.layers import drop_layers
    from fedsoda_cli.spec import load_spec
    from fedsoda_cli.stages.profile import public_input_ids

    spec_text = SPEC.replace(
        "storage_budget = {budget}", "group_size = 1\ngroups = 2\nrerank_top_k = 3\nrerank_sequences = 3"
    ).format(embeddings="bf16")
    (tmp_path / "spec.toml").write_text(spec_text)
    done = fedsoda("run", "spec.toml", "--to", "prune", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((tmp_path / "run" / "prune" / "manifest.json").read_text())["metrics"]["rerank"]
    groups = json.loads((tmp_path / "run" / "prune" / "layer_map.json").read_text())["removed_groups"]
    assert len(record["trials"]) <= 2 * 3 and record["sequences"] == 3
    first = [t for t in record["trials"] if t["group"] == 1]
    assert len(first) == 3 and [t["block"][0] for t in first] == sorted(
        (t["block"][0] for t in first), key=lambda layer: next(x["distance"] for x in first if x["block"][0] == layer)
    )
    best_first = min(first, key=lambda t: t["ppl"])["block"][0]
    assert [best_first] in groups
    # Each trial's perplexity is the pruned model's, measured again here on the same windows.
    spec = load_spec(tmp_path / "spec.toml")
    model, tokenizer = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    torch.set_num_threads(1)
    drop_layers(model, [first[0]["block"][0]])
    windows = public_input_ids(spec, tokenizer)[:3]
    assert perplexity(model.eval(), windows, batch_size=2).perplexity == pytest.approx(first[0]["ppl"], rel=1e-5)
