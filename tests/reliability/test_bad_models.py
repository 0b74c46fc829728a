"""Bad models and damaged artifacts through the CLI: a missing model folder, a checkpoint that is not
a decoder-only causal LM, corrupt or truncated safetensors (exit 6), and stage outputs that no longer
match their manifest (exit 3). Nothing else is changed, and `fedsoda run` redoes a damaged stage."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fedsoda_cli import artifacts

from .conftest import (
    STAGES,
    assert_fails,
    assert_no_scratch_left,
    fedsoda,
    manifest,
    snapshot,
    stage_states,
)


def model_folder(template: Path, tmp_path: Path, damage: str) -> Path:
    """A copy of the template's pruned sub-LLM checkpoint (a real HF folder), damaged as named."""
    folder = tmp_path / f"model-{damage}"
    shutil.copytree(template / "prune" / "model", folder)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "corrupt header":
        with open(weights, "r+b") as handle:
            handle.write(b"\xff" * 8)  # the header length: now absurd
    elif damage in ("bert", "t5"):
        config = {
            "bert": {"model_type": "bert", "architectures": ["BertForMaskedLM"]},
            "t5": {"model_type": "t5", "is_encoder_decoder": True, "architectures": ["T5ForConditionalGeneration"]},
        }[damage]
        (folder / "config.json").write_text(json.dumps(config))
    elif damage == "no weights":
        weights.unlink()
    return folder


MODEL_CASES = {
    "missing": (None, ["no such folder", "check the path"]),
    "truncated": (
        "truncated",
        ["weight file model.safetensors is corrupt or truncated", "re-save or re-download the checkpoint"],
    ),
    "corrupt header": ("corrupt header", ["weight file model.safetensors is corrupt or truncated", "re-save or re-download"]),
    "no weights": ("no weights", ["no weight files (*.safetensors)", "re-save the checkpoint"]),
    "an encoder model": ("bert", ["model type 'bert' is not a decoder-only causal LM", "fedsoda needs a decoder-only causal LM"]),
    "an encoder-decoder model": ("t5", ["model type 't5' is an encoder-decoder model", "fedsoda needs a decoder-only causal LM"]),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_path(case, spec_path, template, workdir, tmp_path):
    damage, needles = MODEL_CASES[case]
    folder = model_folder(template, tmp_path, damage) if damage else tmp_path / "no-model"
    before = snapshot(workdir)
    result = fedsoda("profile", spec_path, "--workdir", workdir, "--set", f"model.path='{folder}'")
    assert_fails(result, "model", f"model.path {folder}", *needles)
    assert snapshot(workdir) == before
    assert_no_scratch_left(workdir)


ARTIFACT_CASES = {
    # case: (stage, file, damage, the command that reads it)
    "a modified file": ("prune", "layer_map.json", "append", "align"),
    "a truncated client model": ("quantize", "model/model.safetensors", "truncate", "federate"),
    "a deleted file": ("align", "model/config.json", "delete", "quantize"),
}


@pytest.mark.parametrize("case", ARTIFACT_CASES)
def test_an_artifact_that_no_longer_matches_its_manifest(case, spec_path, workdir):
    stage, rel, damage, reader = ARTIFACT_CASES[case]
    path = workdir / stage / rel
    if damage == "append":
        path.write_text(path.read_text() + " ")
    elif damage == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    else:
        path.unlink()
    before = snapshot(workdir)
    result = fedsoda(reader, spec_path, "--workdir", workdir)
    what = "but missing" if damage == "delete" else f"no longer matches the '{stage}' manifest (modified or corrupt)"
    assert_fails(result, "artifact", str(path), what, f"rerun `fedsoda {stage}` with --force")
    assert snapshot(workdir) == before
    assert_no_scratch_left(workdir)


def test_a_corrupt_manifest(spec_path, workdir):
    (workdir / "prune" / "manifest.json").write_text('{"stage": "prune", ')
    before = snapshot(workdir)
    result = fedsoda("align", spec_path, "--workdir", workdir)
    assert_fails(
        result, "artifact", str(workdir / "prune" / "manifest.json"), "corrupt manifest", "rerun the 'prune' stage with --force"
    )
    assert snapshot(workdir) == before


def test_run_redoes_a_stage_whose_files_were_damaged(spec_path, workdir):
    """`status` compares spec and input hashes only; `run` also checks a done stage's files before
    skipping it, and redoes it when they were changed."""
    predictions = workdir / "eval" / "predictions.jsonl"
    predictions.write_text("tampered\n")
    upstream = {stage: manifest(workdir, stage) for stage in STAGES[:-1]}
    result = fedsoda("run", spec_path, "--workdir", workdir)
    assert result.exit_code == 0, result.output
    assert "eval: outputs modified or corrupt" in " ".join(result.stdout.split())
    assert predictions.read_text() != "tampered\n"
    artifacts.verify(workdir, artifacts.read_manifest(workdir, "eval"))
    assert {stage: manifest(workdir, stage) for stage in STAGES[:-1]} == upstream  # only eval was redone
    assert stage_states(spec_path, workdir) == dict.fromkeys(STAGES, "done")
