"""Stages out of order: a stage run before its input exists, and an input made under a different spec
(stale). Exit code 3 and one line saying which command to run first; nothing is written."""

from __future__ import annotations

import pytest

from .conftest import (
    STAGES,
    assert_fails,
    assert_no_scratch_left,
    assert_one_line_error,
    fedsoda,
    fedsoda_process,
    snapshot,
)

NEEDS = {"prune": "profile", "align": "prune", "quantize": "align", "federate": "quantize", "eval": "federate"}


@pytest.mark.parametrize("stage", list(NEEDS))
def test_a_stage_before_its_input_exists(stage, spec_path, tmp_path):
    empty = tmp_path / "fresh"
    result = fedsoda(stage, spec_path, "--workdir", empty)
    needed = NEEDS[stage]
    assert_fails(
        result,
        "artifact",
        f"stage '{stage}' needs the output of '{needed}' in {empty / needed}",
        f"run `fedsoda {needed} SPEC` first",
    )
    assert not empty.exists() or not any(empty.iterdir())  # no stage folder, no spec.json


def test_a_stage_before_its_input_as_a_real_process(spec_path, tmp_path):
    done = fedsoda_process("align", spec_path, "--workdir", tmp_path / "fresh")
    assert_one_line_error(done.returncode, done.stderr, 3, "needs the output of 'prune'", "run `fedsoda prune SPEC` first")


STALE_CASES = {
    # the stage run, a spec change upstream of it, the input it makes stale
    "profile settings changed": ("align", "profile.max_span=1", "prune"),
    "pruning changed": ("quantize", "prune.groups=2", "align"),
    "alignment changed": ("federate", "align.steps=2", "quantize"),
    "model changed": ("eval", "model.name='tiny-random-qwen2'", "federate"),
}


@pytest.mark.parametrize("case", STALE_CASES)
def test_an_input_made_under_a_different_spec(case, spec_path, workdir):
    stage, override, stale = STALE_CASES[case]
    before = snapshot(workdir)
    result = fedsoda(stage, spec_path, "--workdir", workdir, "--set", override)
    assert_fails(
        result,
        "artifact",
        f"input '{stale}' in {workdir / stale} is stale",
        f"rerun `fedsoda {stale} SPEC` (or `fedsoda run SPEC`)",
    )
    assert snapshot(workdir) == before
    assert_no_scratch_left(workdir)
    assert {p.name for p in workdir.iterdir() if not p.name.startswith(".")} == {*STAGES, "spec.json", "federate.checkpoints"}
