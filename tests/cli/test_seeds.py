"""`fedsoda run SPEC --seeds 0,1,2`: one sibling workdir per seed, and the stages that do not read
run.seed (nor depend on one that does) copied from the first seed's workdir instead of rerun."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedsoda_cli import artifacts, pipeline
from fedsoda_cli.cli.app import app
from fedsoda_cli.cli.run import parse_seeds
from fedsoda_cli.errors import SpecError
from fedsoda_cli.spec import load_spec

runner = CliRunner()

# The tiny random llama, profile and prune only: seconds on a CPU.
TINY = """\
[run]
name = "seeds"
threads = 1
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
"""

CALLS: list[tuple[str, int]] = []


def _profile(ctx):
    CALLS.append(("profile", ctx.spec.run.seed))
    (ctx.out / "scores.txt").write_text(str(ctx.spec.profile.max_span))
    return pipeline.StageResult()


def _shuffle(ctx):
    CALLS.append(("shuffle", ctx.spec.run.seed))
    (ctx.out / "order.txt").write_text((ctx.inputs["profile"] / "scores.txt").read_text() + f" seed {ctx.spec.run.seed}")
    return pipeline.StageResult()


def _after(ctx):
    CALLS.append(("after", ctx.spec.run.seed))
    (ctx.out / "done.txt").write_text((ctx.inputs["shuffle"] / "order.txt").read_text())
    return pipeline.StageResult()


# profile: seed-free; shuffle: reads run.seed; after: seed-free sections, but its input depends on the seed
TOY = (
    pipeline.Stage("profile", (), ("profile",), _profile),
    pipeline.Stage("shuffle", ("profile",), ("prune", "run.seed"), _shuffle),
    pipeline.Stage("after", ("shuffle",), ("prune",), _after),
)


def _states(spec_path, workdir, seed):
    spec = load_spec(spec_path, [f"run.seed={seed}"])
    return {s.stage: s.state for s in pipeline.status(spec, workdir)}


def test_seeds_run_the_tiny_model_into_sibling_workdirs_and_reuse_profile_and_prune(tmp_path):
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(TINY)
    result = runner.invoke(app, ["run", str(spec_path), "--seeds", "0,1", "--to", "prune"])
    assert result.exit_code == 0, result.output
    first, second = tmp_path / "work-seed0", tmp_path / "work-seed1"
    assert not (tmp_path / "work").exists()
    for seed, folder in ((0, first), (1, second)):
        assert _states(spec_path, folder, seed) == {
            "profile": "done",
            "prune": "done",
            "align": "missing",
            "quantize": "missing",
            "federate": "missing",
            "eval": "missing",
        }
        assert json.loads((folder / "spec.json").read_text())["run"]["seed"] == seed
    for stage in ("profile", "prune"):
        ours, theirs = artifacts.read_manifest(second, stage), artifacts.read_manifest(first, stage)
        assert ours.digest() == theirs.digest() and ours.outputs == theirs.outputs and ours.metrics == theirs.metrics
        artifacts.verify(second, ours)
    assert "profile: reused from" in result.output and "prune: reused from" in result.output
    assert "seed 1: reused from work-seed0: profile, prune" in result.output
    # a second invocation finds everything up to date and copies nothing
    again = runner.invoke(app, ["run", str(spec_path), "--seeds", "0,1", "--to", "prune"])
    assert again.exit_code == 0, again.output
    assert "seed 1: reused from work-seed0: nothing" in again.output and "up to date, skipped" in again.output
    # the report tells the two seeds apart and groups them
    report = runner.invoke(app, ["report", str(first), str(second), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| seeds seed 0 |" in md and "| seeds seed 1 |" in md
    assert "| seeds | fedsoda | 0, 1 | 2 |" in md.split("## Across seeds")[1]


@pytest.fixture
def toy(monkeypatch, tmp_path):
    monkeypatch.setitem(pipeline.PIPELINES, "fedsoda", TOY)
    CALLS.clear()
    spec = tmp_path / "spec.toml"
    spec.write_text("[run]\nname = 'toy'\n[profile]\nmax_span = 2\n")
    return spec


def test_only_stages_free_of_the_seed_are_reused(toy, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(toy), "--seeds", "3,5,7", "--workdir", str(out)])
    assert result.exit_code == 0, result.output
    # profile ran once; shuffle reads the seed and `after` reads shuffle: both ran for every seed
    assert CALLS == [("profile", 3), ("shuffle", 3), ("after", 3), ("shuffle", 5), ("after", 5), ("shuffle", 7), ("after", 7)]
    for seed in (3, 5, 7):
        folder = tmp_path / f"out-seed{seed}"
        assert _states(toy, folder, seed) == {"profile": "done", "shuffle": "done", "after": "done"}
        assert (folder / "after" / "done.txt").read_text() == f"2 seed {seed}"
    assert "seed 5: reused from out-seed3: profile" in result.output


def test_force_reruns_the_first_seed_and_copies_its_fresh_output(toy, tmp_path):
    assert runner.invoke(app, ["run", str(toy), "--seeds", "0,1"]).exit_code == 0
    CALLS.clear()
    result = runner.invoke(app, ["run", str(toy), "--seeds", "0,1", "--force"])
    assert result.exit_code == 0, result.output
    assert CALLS == [("profile", 0), ("shuffle", 0), ("after", 0), ("shuffle", 1), ("after", 1)]
    first, second = (artifacts.read_manifest(tmp_path / "runs" / f"toy-seed{k}", "profile") for k in (0, 1))
    assert first.digest() == second.digest()


def test_reused_files_are_hard_links_and_a_rerun_in_the_sibling_leaves_the_first_seeds_as_they_were(toy, tmp_path):
    """Seed-free stages cost no disk per seed (a large model's float checkpoints would), and sharing the
    inode is safe: a stage rerun swaps a new folder in instead of writing into the shared file."""
    import os

    assert runner.invoke(app, ["run", str(toy), "--seeds", "0,1"]).exit_code == 0
    ours, theirs = (tmp_path / "runs" / f"toy-seed{k}" / "profile" / "scores.txt" for k in (0, 1))
    assert os.path.samefile(ours, theirs) and os.stat(ours).st_nlink == 2
    sibling = tmp_path / "runs" / "toy-seed1"
    rerun = runner.invoke(app, ["run", str(toy), "--set", "run.seed=1", "--workdir", str(sibling), "--force"])
    assert rerun.exit_code == 0, rerun.output
    assert not os.path.samefile(ours, theirs) and os.stat(ours).st_nlink == 1
    assert ours.read_text() == theirs.read_text() == "2"
    artifacts.verify(tmp_path / "runs" / "toy-seed0", artifacts.read_manifest(tmp_path / "runs" / "toy-seed0", "profile"))


def test_a_changed_seed_free_section_makes_the_copy_stale_like_any_stage(toy, tmp_path):
    assert runner.invoke(app, ["run", str(toy), "--seeds", "0,1"]).exit_code == 0
    spec = load_spec(toy, ["run.seed=1", "profile.max_span=3"])
    assert {s.stage: s.state for s in pipeline.status(spec, tmp_path / "runs" / "toy-seed1")}["profile"] == "stale"


def test_bad_seed_lists_are_one_line_spec_errors(toy):
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("", "a,b", "1,1", "-1"):
        with pytest.raises(SpecError, match="--seeds"):
            parse_seeds(bad)
    result = runner.invoke(app, ["run", str(toy), "--seeds", "0,x"])
    assert result.exit_code == 2 and "--seeds" in result.output
