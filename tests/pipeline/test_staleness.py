"""make-like behaviour: done / stale / missing, input checks, and `run` skipping up-to-date stages."""

import json

import pytest
from rich.console import Console

from fedsoda_cli import pipeline
from fedsoda_cli.errors import ArtifactError
from fedsoda_cli.spec import load_spec, sections_hash

CALLS: list[str] = []


def first_stage(ctx):
    CALLS.append("first")
    (ctx.out / "numbers.txt").write_text(str(ctx.spec.profile.max_span))
    return pipeline.StageResult(metrics={"max_span": ctx.spec.profile.max_span})


def second_stage(ctx):
    CALLS.append("second")
    upstream = (ctx.inputs["first"] / "numbers.txt").read_text()
    (ctx.out / "doubled.txt").write_text(str(2 * int(upstream) + ctx.spec.prune.groups))
    return pipeline.StageResult()


STAGES = (
    pipeline.Stage("first", (), ("profile",), first_stage),
    pipeline.Stage("second", ("first",), ("prune",), second_stage),
)


@pytest.fixture
def toy(monkeypatch, tmp_path):
    monkeypatch.setitem(pipeline.PIPELINES, "fedsoda", STAGES)
    CALLS.clear()
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text("[profile]\nmax_span = 3\n")
    return spec_path, tmp_path / "work"


def states(spec, workdir):
    return {s.stage: s.state for s in pipeline.status(spec, workdir)}


def run_all(spec, workdir):
    for stage in pipeline.stages_for(spec):
        pipeline.execute(spec, workdir, stage, Console(quiet=True))


def test_missing_then_done(toy):
    spec_path, workdir = toy
    spec = load_spec(spec_path)
    assert states(spec, workdir) == {"first": "missing", "second": "missing"}
    run_all(spec, workdir)
    assert states(spec, workdir) == {"first": "done", "second": "done"}
    assert (workdir / "second" / "doubled.txt").read_text() == "9"


def test_a_stage_before_its_input_says_what_to_run(toy):
    spec_path, workdir = toy
    spec = load_spec(spec_path)
    with pytest.raises(ArtifactError, match=r"needs the output of 'first'.*run `fedsoda first SPEC` first"):
        pipeline.execute(spec, workdir, STAGES[1], Console(quiet=True))


def test_spec_change_makes_a_stage_and_its_dependents_stale(toy):
    spec_path, workdir = toy
    run_all(load_spec(spec_path), workdir)
    changed = load_spec(spec_path, ["profile.max_span=5"])
    assert states(changed, workdir) == {"first": "stale", "second": "stale"}
    only_second = load_spec(spec_path, ["prune.groups=1"])
    assert states(only_second, workdir) == {"first": "done", "second": "stale"}


def test_a_stale_stage_names_the_keys_that_changed(toy):
    spec_path, workdir = toy
    run_all(load_spec(spec_path), workdir)
    reasons = {s.stage: s.reason for s in pipeline.status(load_spec(spec_path, ["prune.groups=1"]), workdir)}
    assert reasons == {"first": "", "second": "spec changed since it ran: prune.groups"}
    two = {
        s.stage: s.reason for s in pipeline.status(load_spec(spec_path, ["profile.max_span=5", "profile.tokens=all"]), workdir)
    }
    assert two["first"] == "spec changed since it ran: profile.max_span, profile.tokens"
    assert two["second"] == "input 'first' is stale"


def test_a_manifest_without_key_hashes_names_the_sections(toy):
    # a workdir written before manifests kept per-key hashes: the stage is still stale, and says where to look
    spec_path, workdir = toy
    run_all(load_spec(spec_path), workdir)
    path = workdir / "second" / "manifest.json"
    data = json.loads(path.read_text())
    assert data.pop("spec_keys")["prune.groups"]
    path.write_text(json.dumps(data))
    [_, second] = pipeline.status(load_spec(spec_path, ["prune.groups=1"]), workdir)
    assert (second.state, second.reason) == ("stale", "spec sections changed: one of prune")


def test_stale_input_is_refused(toy):
    spec_path, workdir = toy
    run_all(load_spec(spec_path), workdir)
    changed = load_spec(spec_path, ["profile.max_span=5"])
    with pytest.raises(ArtifactError, match="input 'first'.*stale"):
        pipeline.execute(changed, workdir, STAGES[1], Console(quiet=True))


def test_rerun_of_an_input_makes_the_dependent_stale(toy):
    spec_path, workdir = toy
    run_all(load_spec(spec_path), workdir)
    changed = load_spec(spec_path, ["profile.max_span=4"])
    pipeline.execute(changed, workdir, STAGES[0], Console(quiet=True))
    assert states(changed, workdir) == {"first": "done", "second": "stale"}


def test_corrupted_input_is_refused(toy):
    spec_path, workdir = toy
    spec = load_spec(spec_path)
    run_all(spec, workdir)
    (workdir / "first" / "numbers.txt").write_text("999")
    with pytest.raises(ArtifactError, match="numbers.txt.*no longer matches"):
        pipeline.execute(spec, workdir, STAGES[1], Console(quiet=True))


def test_the_per_round_evaluations_eval_keys_make_federate_stale_and_the_final_targets_do_not(tmp_path):
    # federate's per-round evaluation scores with eval.batch_size and eval.max_new_tokens (a generation
    # task's answers depend on the latter), so they are federate's inputs; which targets the final eval
    # scores is not
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text('[task]\nname = "gsm8k"\ntrain_examples = 64\n[federate]\neval_every = 1\n')
    base = load_spec(spec_path)
    federate = pipeline.stage_named(base, "federate")

    def federate_hash(*overrides):
        return sections_hash(load_spec(spec_path, list(overrides)), federate.sections)

    assert federate_hash() == sections_hash(base, federate.sections)
    assert federate_hash("eval.max_new_tokens=32") != federate_hash()
    assert federate_hash("eval.batch_size=2") != federate_hash()
    assert federate_hash('eval.targets=["plugin"]') == federate_hash()


@pytest.mark.parametrize("stage", ["align", "realign"])
def test_the_task_prompt_makes_align_and_realign_stale_and_the_task_data_does_not(tmp_path, stage):
    # align.text = "task_prompts" pours public text into the task's prompt template: the template's
    # keys are align's and realign's inputs; the task's examples are not (align never reads them)
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text('[align]\ntext = "task_prompts"\n')
    base = load_spec(spec_path)
    sections = pipeline.REALIGN.sections if stage == "realign" else pipeline.stage_named(base, stage).sections

    def stage_hash(*overrides):
        return sections_hash(load_spec(spec_path, list(overrides)), sections)

    assert stage_hash("task.prompt=Text: {sentence}\nMood:") != stage_hash()
    assert stage_hash("task.name=boolq") != stage_hash()
    assert stage_hash('align.text="public"') != stage_hash()
    assert stage_hash("task.train_examples=64") == stage_hash()
    assert stage_hash("task.eval_examples=64") == stage_hash()
    # with plain public text the task is not align's input at all (a test suite swaps tasks on one workdir)
    plain = ('align.text="public"',)
    assert stage_hash(*plain, "task.name=boolq") == stage_hash(*plain)
    assert stage_hash(*plain, "task.prompt=Text: {sentence}\nMood:") == stage_hash(*plain)
