"""Broken plugins through the CLI: a plugin file that is missing, does not import, raises at import or
registers something that is not a plugin; a name nobody registered; a pruner or aggregator that
raises or returns the wrong thing. Exit code 4 and one line naming the plugin and the fix."""

from __future__ import annotations

import re

import pytest

from .conftest import (
    STAGES,
    assert_fails,
    assert_no_scratch_left,
    assert_one_line_error,
    fedsoda,
    fedsoda_process,
    snapshot,
    stage_states,
)

FILE_CASES = {
    # case: (plugin file content or None for no file, needles)
    "missing": (None, ["not found (spec key 'plugins')", "give a path relative to the spec"]),
    "a syntax error": ("def broken(:\n", ["failed to import: SyntaxError", "fix the file or remove it from 'plugins'"]),
    "raises at import": (
        "raise RuntimeError('boom at import')\n",
        ["failed to import: RuntimeError: boom at import", "fix the file"],
    ),
    "imports a missing module": ("import no_such_module_xyz\n", ["failed to import: ModuleNotFoundError", "fix the file"]),
    "registers a non-class": (
        "from fedsoda_cli.plugins import pruners\npruners.register('reliability-number')(42)\n",
        ["pruner 'reliability-number' must be a subclass of fedsoda_cli.plugins.contracts.Pruner, got 42"],
    ),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_a_broken_plugin_file(case, tmp_path):
    content, needles = FILE_CASES[case]
    plugin = tmp_path / f"plugin_{case.replace(' ', '_').replace('-', '_')}.py"
    if content is not None:
        plugin.write_text(content)
    spec = tmp_path / "spec.toml"
    spec.write_text(f'plugins = ["{plugin.name}"]\n')
    assert_fails(fedsoda("validate", spec), "plugin", f"plugin file {plugin}", *needles)


NAME_CASES = {
    "an unknown aggregator": (
        "federate.aggregator='fedavgg'",
        ["unknown aggregator 'fedavgg'", "did you mean 'fedavg'", "registered: "],
    ),
    "an unknown pruner": ("prune.strategy='spg'", ["unknown pruner 'spg'", "did you mean 'sgp'", "registered: block-influence"]),
}


@pytest.mark.parametrize("case", NAME_CASES)
def test_a_name_that_is_not_registered(case, spec_path):
    override, needles = NAME_CASES[case]
    assert_fails(fedsoda("validate", spec_path, "--set", override), "plugin", *needles)


def test_an_unregistered_name_as_a_real_process(spec_path):
    done = fedsoda_process("validate", spec_path, "--set", "federate.aggregator='fedavgg'")
    assert_one_line_error(done.returncode, done.stderr, 4, "unknown aggregator 'fedavgg'", "did you mean 'fedavg'")


PRUNER_CASES = {
    "raises": ["pruning strategy 'reliability-raises'", "failed in select(): ValueError: select exploded"],
    "not-a-list": [
        "pruning strategy 'reliability-not-a-list' returned an invalid selection",
        "is not a list of lists of layer indices",
        "fix its select() (see docs/plugins.md)",
    ],
    "overlapping": [
        "pruning strategy 'reliability-overlapping' returned an invalid selection",
        "groups overlap at layers [3]",
        "fix its select()",
    ],
}


@pytest.mark.parametrize("case", PRUNER_CASES)
def test_a_pruner_that_breaks_its_contract(case, spec_path, workdir):
    before = snapshot(workdir)
    result = fedsoda("prune", spec_path, "--workdir", workdir, "--set", f"prune.strategy='reliability-{case}'")
    assert_fails(result, "plugin", *PRUNER_CASES[case])
    assert snapshot(workdir) == before
    assert_no_scratch_left(workdir)


@pytest.mark.parametrize("command", ["validate", "federate"])
def test_an_aggregator_option_it_does_not_take(command, spec_path, workdir):
    before = snapshot(workdir)
    result = fedsoda(command, spec_path, "--workdir", workdir, "--set", "federate.aggregator_options={trim=0.2}")
    assert_fails(
        result,
        "plugin",
        "aggregator 'fedavg'",
        "failed to start",
        "unexpected keyword argument 'trim'",
        "fix the options the spec gives it (e.g. federate.aggregator_options)",
    )
    assert snapshot(workdir) == before


@pytest.mark.timeout(300)
def test_an_aggregator_that_returns_the_wrong_shapes(spec_path, workdir):
    """Found after round 1's client updates, with real workers: the run stops with the plugin named,
    the workers end, and the earlier federate output stays."""
    stages_before = {rel: d for rel, d in snapshot(workdir).items() if not rel.startswith("federate.checkpoints")}
    result = fedsoda("federate", spec_path, "--workdir", workdir, "--set", "federate.aggregator='reliability-wrong-shape'")
    line = assert_fails(result, "plugin", "aggregator 'reliability-wrong-shape' returned", "fix the plugin's aggregate()")
    assert re.search(
        r"returned '[\w.]+lora_[AB]\.weight' as \(1, \d+\) torch.float32, expected \(\d+, \d+\) torch.float32", line
    ), line
    assert {rel: d for rel, d in snapshot(workdir).items() if not rel.startswith("federate.checkpoints")} == stages_before
    assert_no_scratch_left(workdir)
    assert stage_states(spec_path, workdir) == dict.fromkeys(STAGES, "done")
