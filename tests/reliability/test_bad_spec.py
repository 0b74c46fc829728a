"""Bad specs and bad `--set` overrides, through the CLI against a complete run: each gives exit code 2
and one line naming the file (and line) or the override, the key, what is allowed and how to fix it,
and leaves the run's artifacts as they were."""

from __future__ import annotations

import shutil

import pytest

from .conftest import (
    assert_fails,
    assert_no_scratch_left,
    assert_one_line_error,
    fedsoda,
    fedsoda_process,
    snapshot,
)


@pytest.fixture(scope="module")
def run_copy(template, tmp_path_factory):
    """One copy of the complete run for the whole module: no case here may change it."""
    copy = tmp_path_factory.mktemp("bad-spec") / "run"
    shutil.copytree(template, copy)
    return copy


def run_with(tmp_path, run_copy, text: str | bytes, *args):
    """`fedsoda run` of a spec file holding `text`, against the complete run; asserts it is untouched."""
    spec = tmp_path / "bad.toml"
    spec.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = snapshot(run_copy)
    result = fedsoda("run", spec, "--workdir", run_copy, *args)
    assert snapshot(run_copy) == before
    assert_no_scratch_left(run_copy)
    return result


FILE_CASES = {
    # case: (spec text, needles: file/line, key, what is allowed / how to fix)
    "not TOML": ("[run]\nname = \n", ["bad.toml", "not valid TOML", "line 2", "fix the syntax"]),
    "not UTF-8": (b"[run]\nname = '\xff'\n", ["bad.toml", "not a UTF-8 text file", "a spec is a TOML file"]),
    "unknown section": ("[federat]\nrounds = 3\n", ["bad.toml:1", "unknown key 'federat'", "did you mean 'federate'"]),
    "unknown key": ("[federate]\nround = 3\n", ["bad.toml:2", "unknown key 'federate.round'", "did you mean 'rounds'"]),
    "wrong type": ("[prune]\ngroups = 'four'\n", ["bad.toml:2", "prune.groups", "valid integer", "got 'four'"]),
    "wrong choice": (
        "[federate]\npartition = 'random'\n",
        ["bad.toml:2", "federate.partition", "'iid', 'dirichlet' or 'shards'", "got 'random'"],
    ),
    "negative rounds": ("[federate]\nrounds = -1\n", ["bad.toml:2", "federate.rounds", "greater than or equal to 1", "got -1"]),
    "dirichlet alpha 0": ("[federate]\ndirichlet_alpha = 0\n", ["bad.toml:2", "federate.dirichlet_alpha", "greater than 0"]),
    "lora alpha 0": ("[lora]\nalpha = 0\n", ["bad.toml:2", "lora.alpha", "greater than or equal to 1"]),
    "temperature 0": ("[align]\ntau = 0\n", ["bad.toml:2", "align.tau", "greater than 0"]),
    "more clients per round than clients": (
        "[federate]\nclients = 2\nclients_per_round = 5\n",
        ["bad.toml:1", "federate.clients_per_round (5) must be <= federate.clients (2)"],
    ),
    "min_clients above clients_per_round": (
        "[federate]\nclients_per_round = 2\nmin_clients = 3\n",
        ["bad.toml:1", "federate.min_clients (3) must be <= federate.clients_per_round (2)"],
    ),
    "profile text is the held-out text": (
        "[public_data]\nsplit = 'test'\nheldout_split = 'test'\n",
        ["bad.toml:1", "public_data.split and public_data.heldout_split must differ"],
    ),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_spec_file(case, tmp_path, run_copy):
    text, needles = FILE_CASES[case]
    assert_fails(run_with(tmp_path, run_copy, text), "spec", *needles)


def test_missing_spec_file(tmp_path):
    assert_fails(fedsoda("validate", tmp_path / "nope.toml"), "spec", "nope.toml", "spec file not found", "pass the path")


OVERRIDE_CASES = {
    "no value": ("federate.rounds", ["--set 'federate.rounds'", "expected section.key=value"]),
    "no section": ("rounds=3", ["--set 'rounds=3'", "expected section.key=value"]),
    "unknown section": ("federat.rounds=3", ["--set 'federat.rounds=3'", "unknown section 'federat'", "did you mean 'federate'"]),
    "unknown key": ("federate.rouns=3", ["--set 'federate.rouns=3'", "unknown key 'federate.rouns'", "did you mean 'rounds'"]),
    "key below a value": ("federate.rounds.x=1", ["--set 'federate.rounds.x=1'", "'rounds'", "is a value, not a section"]),
    "not a number": ("federate.rounds=abc", ["--set 'federate.rounds=abc'", "federate.rounds", "valid integer", "got 'abc'"]),
    "out of range": (
        "federate.rounds=-2",
        ["--set 'federate.rounds=-2'", "federate.rounds", "greater than or equal to 1", "got -2"],
    ),
    "contradicts the file": (
        "federate.clients_per_round=9",
        ["spec.toml", "--set 'federate.clients_per_round=9'", "federate.clients_per_round (9) must be <= federate.clients (2)"],
    ),
}


@pytest.mark.parametrize("case", OVERRIDE_CASES)
def test_bad_override(case, spec_path, run_copy):
    override, needles = OVERRIDE_CASES[case]
    before = snapshot(run_copy)
    result = fedsoda("run", spec_path, "--workdir", run_copy, "--set", override)
    assert_fails(result, "spec", *needles)
    assert snapshot(run_copy) == before


def test_a_bad_value_from_set_is_blamed_on_the_set_not_on_the_file(spec_path):
    line = assert_fails(fedsoda("validate", spec_path, "--set", "federate.rounds=0"), "spec", "--set 'federate.rounds=0'")
    assert "spec.toml" not in line  # the file says rounds = 3, which is fine


def test_more_layers_removed_than_the_model_has(spec_path, run_copy):
    """groups x group_size >= layer count needs the model to check: `run` reruns profile-complete
    prune, which refuses before writing anything."""
    before = snapshot(run_copy)
    result = fedsoda("run", spec_path, "--workdir", run_copy, "--set", "prune.groups=3", "--set", "prune.group_size=2")
    assert_fails(
        result,
        "spec",
        "prune.groups = 3 x prune.group_size = 2 removes 6 of the model's 6 layers",
        "at most 3 can go",
        "lower prune.groups or prune.group_size",
    )
    assert snapshot(run_copy) == before
    assert_no_scratch_left(run_copy)


def test_run_range_that_is_not_a_stage(spec_path, run_copy):
    assert_fails(
        fedsoda("run", spec_path, "--workdir", run_copy, "--from", "prun"),
        "spec",
        "--from 'prun'",
        "not a stage of this method",
        "choose one of profile, prune",
    )


def test_a_spec_error_as_a_real_process(tmp_path):
    """What CI sees: exit code 2, one stderr line, no traceback, nothing on stdout."""
    spec = tmp_path / "ci.toml"
    spec.write_text("[federate]\nround = 3\n")
    done = fedsoda_process("validate", spec)
    assert_one_line_error(done.returncode, done.stderr, 2, "ci.toml:2", "unknown key 'federate.round'", "did you mean 'rounds'")
    assert done.stdout == ""
