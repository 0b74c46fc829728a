"""`fedsoda report` on run folders written by the code's own writers (spec.json by record_spec, stage
folders with real manifests, summary.json by the federate stage's summarize, metrics.jsonl lines of
the round-record shape): a FedPETuning baseline and a FedSODA run whose numbers give known changes
(-70 % communication, -75 % storage, +3 accuracy points), seed groups, labels and plots."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import pytest

from fedsoda_cli import artifacts, pipeline
from fedsoda_cli.compare import (
    BASELINE,
    RunSummary,
    baseline_for,
    change_vs,
    label_runs,
    read_run,
    seed_groups,
    step_time_control,
    write_report,
)
from fedsoda_cli.errors import ArtifactError, SpecError
from fedsoda_cli.federated.accounting import Ledger
from fedsoda_cli.federated.server import RunResult
from fedsoda_cli.round_record import RoundRecord
from fedsoda_cli.spec.load import validate
from fedsoda_cli.stages.federate import summarize
from tests.stage_folders import write_stage_folder

WALLS = {"quantize": 2.0, "federate": 10.0, "eval": 3.0}


def _spec(name, method, seed=0, **sections):
    raw = {
        "run": {"name": name, "method": method, "seed": seed},
        "model": {"name": "tiny-random-llama"},
        "task": {"name": "sst2"},
        **sections,
    }
    return validate(raw, Path("spec.toml"))


def _round(i, down, up, realign=0, *, eval=None, step=0.01, rss=500.0):
    """The record of one round, from a metrics.jsonl line as the federate server writes it."""
    record = {
        "round": i,
        "clients": [0, 1],
        "updated": [0, 1],
        "excluded": [],
        "failed": [],
        "train_loss": 1.0 / i,
        "train_seconds": 0.2,
        "train_seconds_by_worker": {"0": 0.2},
        "worker_rss_mb": rss,
        "global_digest": f"d{i}",
        "bytes_down": down,
        "bytes_up": up,
        "bytes_realign": realign,
        "seconds": 0.3,
        "step_seconds": step,
    }
    if eval:
        record["eval"] = {
            target: {
                "accuracy": a,
                "ci95": [a - 0.1, a + 0.1],
                "correct": int(100 * a),
                "count": 100,
                "label_shares": {"positive": 0.5, "negative": 0.5},
                "loss": 0.7,
                "seconds": 1.0,
            }
            for target, a in eval.items()
        }
    return RoundRecord.from_json(record)


def _rounds(down, up, realign=(0, 0), evals=None, step=0.01, rss=500.0):
    return [_round(i + 1, down, up, realign[i], eval=evals[i] if evals else None, step=step, rss=rss) for i in range(2)]


def _results(accuracy, extra=None):
    """eval/results.json as the eval stage writes it (extra: per-target keys of run.method local)."""
    return {
        t: {
            "task": "sst2",
            "metric": "label-word accuracy",
            "accuracy": a,
            "correct": int(a * 100),
            "count": 100,
            "ci95": [a - 0.05, a + 0.05],
            "perplexity": 20.0,
            "perplexity_nll": 3.0,
            "perplexity_tokens": 64,
            "seconds": 1.0,
            **({"plugin_scale": {"scale": 1.0, "chosen_on": "spec", "candidates": []}} if t == "plugin" else {}),
            **(extra or {}).get(t, {}),
        }
        for t, a in accuracy.items()
    }


def _run(
    tmp_path, folder, spec, *, model_bytes=100, adapter_bytes=10, model_download=100, rounds=(), accuracy=None, results_extra=None
):
    workdir = tmp_path / folder
    pipeline.record_spec(spec, workdir)
    ledger = Ledger()
    ledger.add("model", 0, model_download)
    for r in rounds:
        ledger.add("adapter_down", 0, r.bytes_down)
        ledger.add("adapter_up", 0, r.bytes_up)
        ledger.add("realign", 0, r.bytes_realign)
    result = RunResult(
        adapter=None, history=list(rounds), ledger=ledger, resumed_after=0, aggregator_state={}, realign_layers=None
    )

    def federate(out):
        (out / "adapter").mkdir()
        (out / "adapter" / "adapter_model.safetensors").write_bytes(b"a" * adapter_bytes)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in rounds))
        (out / "summary.json").write_text(json.dumps(summarize(spec, result, 10.0)))

    def quantize(out):
        (out / "model").mkdir()
        (out / "model" / "model.safetensors").write_bytes(b"x" * model_bytes)

    fills = {
        "quantize": quantize,
        "federate": federate,
        "eval": lambda out: (out / "results.json").write_text(json.dumps(_results(accuracy or {}, results_extra))),
    }
    stage_spec = spec
    try:
        pipeline.stages_for(spec)
    except SpecError:  # a reference method whose stages are not registered here: its folders are fedsoda's
        stage_spec = _spec(spec.run.name, "fedsoda", spec.run.seed)
    for stage in pipeline.stages_for(stage_spec):
        write_stage_folder(workdir, stage_spec, stage.name, fills.get(stage.name, lambda out: None))
        manifest_path = workdir / stage.name / artifacts.MANIFEST
        manifest = json.loads(manifest_path.read_text())
        manifest["wall_time_s"] = WALLS.get(stage.name, 0.0)  # the one field a test cannot get from a real run
        manifest_path.write_text(json.dumps(manifest))
    return workdir


@pytest.fixture
def two_runs(tmp_path):
    baseline = _run(
        tmp_path,
        "petuning",
        _spec("petuning", "fedpetuning"),
        model_bytes=800,
        adapter_bytes=200,
        model_download=1000,
        rounds=_rounds(200, 200, step=0.02, rss=1000.0),
        accuracy={"plugin": 0.80, "sub": 0.78},
    )
    ours = _run(
        tmp_path,
        "soda",
        _spec("soda", "fedsoda"),
        model_bytes=200,
        adapter_bytes=50,
        model_download=250,
        rounds=_rounds(50, 50, (0, 90), evals=[{"sub": 0.6, "plugin": 0.7}, {"sub": 0.8, "plugin": 0.83}]),
        accuracy={"plugin": 0.83, "sub": 0.81, "zero-shot": 0.5},
    )
    return baseline, ours


def test_each_run_is_compared_with_the_control_of_its_partition_and_seed(tmp_path):
    def summary(name, method, seed, partition):
        spec = {"run": {"seed": seed}, "federate": {"partition": partition, "dirichlet_alpha": 0.5}}
        return RunSummary(name, tmp_path / name, method, "m", "sst2", spec=spec)

    controls = [summary(f"fp-{p}-{s}", BASELINE, s, p) for p in ("iid", "dirichlet") for s in (0, 1)]
    ours = {(p, s): summary(f"soda-{p}-{s}", "fedsoda", s, p) for p in ("iid", "dirichlet") for s in (0, 1, 2)}
    runs = controls + list(ours.values())
    assert baseline_for(ours["dirichlet", 1], runs).name == "fp-dirichlet-1"
    assert baseline_for(ours["iid", 0], runs).name == "fp-iid-0"
    assert baseline_for(ours["dirichlet", 2], runs).name == "fp-dirichlet-0"  # no seed 2: the partition decides
    assert baseline_for(ours["dirichlet", 0], runs).partition == "dirichlet 0.5"
    only_iid = [c for c in controls if c.partition == "iid"] + [ours["dirichlet", 1]]
    assert baseline_for(ours["dirichlet", 1], only_iid).name == "fp-iid-1"  # then the seed
    other_task = RunSummary("x", tmp_path, "fedsoda", "m", "boolq")
    assert baseline_for(other_task, runs) is None


def test_changes_against_the_fedpetuning_run(two_runs):
    base, ours = read_run(two_runs[0]), read_run(two_runs[1])
    assert (ours.method, ours.model, ours.task, ours.seed, ours.partition) == ("fedsoda", "tiny-random-llama", "sst2", 0, "iid")
    assert ours.client_storage_bytes == 250 and base.client_storage_bytes == 1000  # quantize/model/ + federate/adapter/
    assert ours.communication_total == 540 and base.communication_total == 1800
    assert baseline_for(ours, [base, ours]) is base and baseline_for(base, [base, ours]) is None
    change = change_vs(ours, base)
    assert change["communication_pct"] == pytest.approx(-70.0)
    assert change["communication_rounds_pct"] == pytest.approx(100 * (290 / 800 - 1))
    assert change["storage_pct"] == pytest.approx(-75.0)
    assert change["accuracy_plugin_pts"] == pytest.approx(3.0)
    assert change["accuracy_sub_pts"] == pytest.approx(3.0)
    assert ours.cumulative_communication() == [(0, 250), (1, 350), (2, 540)]
    assert {s: t for s, t in ours.wall_time_s.items() if t} == WALLS
    assert ours.eval_rounds() == {"sub": [(1, 0.6, 350), (2, 0.8, 540)], "plugin": [(1, 0.7, 350), (2, 0.83, 540)]}
    assert base.eval_rounds() == {} and base.step_seconds == pytest.approx(0.02) and base.peak_rss_mb == 1000.0


def test_the_paired_gain_over_zero_shot_is_reported_as_eval_wrote_it(tmp_path):
    from fedsoda_cli.evaluation.stats import paired_difference

    paired = paired_difference(
        [True] * 12 + [False] * 2 + [True] * 70 + [False] * 16, [False] * 12 + [True] * 2 + [True] * 70 + [False] * 16
    )
    run = _run(
        tmp_path,
        "soda",
        _spec("soda", "fedsoda"),
        rounds=_rounds(50, 50),
        accuracy={"plugin": 0.82, "zero-shot": 0.72},
        results_extra={"plugin": {"vs_zero_shot": paired.to_json()}},
    )
    assert read_run(run).vs_zero_shot["plugin"]["only_a"] == 12
    write_report([run], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    lo, hi = paired.ci95
    assert f"| soda | plugin | +10.0 | [{100 * lo:+.1f}, {100 * hi:+.1f}] | {paired.p_mcnemar:.2g} | 12 / 2 |" in md


def test_a_plugin_plugged_in_at_another_scale_says_so(tmp_path):
    from fedsoda_cli.evaluation.plugin_scale import Candidate, ScaleChoice

    choice = ScaleChoice(0.5, "val", [Candidate(0.5, 0.9, 180, 200, 0.3), Candidate(1.0, 0.8, 160, 200, 0.4)])
    scaled = _run(
        tmp_path,
        "scaled",
        _spec("scaled", "fedsoda", eval={"plugin_scale": "val"}, task={"name": "sst2", "train_examples": 100}),
        accuracy={"plugin": 0.82},
        results_extra={"plugin": {"plugin_scale": choice.to_json()}},
    )
    plain = _run(tmp_path, "plain", _spec("plain", "fedsoda", 1), accuracy={"plugin": 0.80})
    assert read_run(scaled).plugin_scale == 0.5 and read_run(plain).plugin_scale == 1.0
    write_report([scaled, plain], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| 82.0 [77.0, 87.0] at s 0.5 |" in md
    assert "| 80.0 [75.0, 85.0] |" in md
    rows = list(csv.DictReader(open(tmp_path / "report" / "report.csv")))
    assert sorted(row["plugin_scale"] for row in rows) == ["0.5", "1.0"]


def test_report_files(two_runs, tmp_path):
    files = write_report(list(two_runs), tmp_path / "report")
    names = sorted(f.name for f in files)
    assert names == [
        "accuracy_per_round.png",
        "accuracy_vs_communication.png",
        "accuracy_vs_storage.png",
        "communication_per_round.png",
        "report.csv",
        "report.md",
    ]
    pngs = ("accuracy_per_round.png", "accuracy_vs_communication.png", "accuracy_vs_storage.png", "communication_per_round.png")
    for png in pngs:
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    md = (tmp_path / "report" / "report.md").read_text()
    rounds_only = f"{100 * (290 / 800 - 1):+.1f} %"
    assert f"| soda | petuning | -70.0 % | {rounds_only} | -75.0 % | +3.0 pts | +3.0 pts |" in md
    assert "83.0 [78.0, 88.0]" in md
    # every image link renders: ![alt](file), never !(file) or an empty alt
    assert "![accuracy per round](accuracy_per_round.png)" in md
    assert "![accuracy vs communication](accuracy_vs_communication.png)" in md
    assert "![communication per round](communication_per_round.png)" in md
    assert "![accuracy vs storage](accuracy_vs_storage.png)" in md
    assert "!(" not in md and "![]" not in md
    assert len(re.findall(r"!\[[^\]]+\]\([^)]+\.png\)", md)) == 4
    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "report" / "report.csv"))}
    assert float(rows["soda"]["storage_pct"]) == pytest.approx(-75.0)
    assert rows["soda"]["baseline"] == "petuning" and rows["petuning"]["baseline"] == ""
    assert int(rows["soda"]["communication_realign_bytes"]) == 90
    assert float(rows["soda"]["wall_time_total_s"]) == pytest.approx(15.0)


def test_no_accuracy_plots_without_eval_records(tmp_path):
    workdir = _run(tmp_path, "plain", _spec("plain", "fedsoda"), rounds=_rounds(10, 20, (0, 5)), accuracy={"sub": 0.7})
    files = write_report([workdir], tmp_path / "out")
    assert [f.name for f in files if f.suffix == ".png"] == ["communication_per_round.png"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "accuracy_per_round" not in md and "accuracy_vs_communication" not in md
    assert "No `fedpetuning` run" in md


def test_a_run_without_federate_has_no_communication(tmp_path):
    spec = _spec("early", "fedsoda")
    workdir = tmp_path / "early"
    pipeline.record_spec(spec, workdir)
    write_stage_folder(workdir, spec, "profile")
    run = read_run(workdir)
    assert run.communication == {} and run.communication_total is None and run.client_storage_bytes is None
    assert (run.method, run.name, run.rounds) == ("fedsoda", "early", [])


def test_runs_of_one_spec_get_distinct_labels(tmp_path):
    seeds = [
        _run(
            tmp_path,
            f"quickstart-seed{k}",
            _spec("quickstart", "fedsoda", seed=k),
            rounds=_rounds(1, 1, evals=[{"sub": 0.5}, {"sub": 0.6}]),
            accuracy={"plugin": 0.8},
        )
        for k in (0, 1)
    ]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    same_seed = [
        _run(tmp_path / "a", "qs-iid", _spec("qs", "fedsoda"), accuracy={"plugin": 0.8}),
        _run(tmp_path / "b", "qs-dirichlet", _spec("qs", "fedsoda"), accuracy={"plugin": 0.7}),
    ]
    runs = [read_run(w) for w in [*seeds, *same_seed]]
    label_runs(runs)
    assert [r.label for r in runs] == ["quickstart seed 0", "quickstart seed 1", "qs (qs-iid)", "qs (qs-dirichlet)"]
    write_report([*seeds, *same_seed], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    main = md.split("## Main table")[1].split("##")[0]
    assert all(f"| {label} |" in main for label in [r.label for r in runs])
    rows = list(csv.DictReader(open(tmp_path / "out" / "report.csv")))
    assert [r["label"] for r in rows] == [r.label for r in runs] and [r["seed"] for r in rows] == ["0", "1", "0", "0"]


def test_across_seeds_mean_and_sample_std(tmp_path):
    plugin, sub = [0.80, 0.82, 0.87], [0.70, 0.74, 0.75]
    workdirs = [
        _run(
            tmp_path,
            f"soda-seed{k}",
            _spec("soda", "fedsoda", seed=k),
            accuracy={"plugin": plugin[k], "sub": sub[k], "zero-shot": 0.5},
        )
        for k in range(3)
    ]
    workdirs.append(_run(tmp_path, "petuning", _spec("petuning", "fedpetuning"), accuracy={"plugin": 0.79}))
    workdirs.append(
        _run(tmp_path, "soda-other", _spec("soda", "fedsoda", seed=0, federate={"rounds": 7}), accuracy={"plugin": 0.6})
    )
    runs = [read_run(w) for w in workdirs]
    label_runs(runs)
    groups = seed_groups(runs)
    assert [len(g.runs) for g in groups] == [3, 1, 1]  # federate.rounds differs: not the same spec
    assert groups[0].seeds == [0, 1, 2]
    mean, std, n = groups[0].accuracy("plugin")
    assert (mean, std, n) == (pytest.approx(statistics.mean(plugin)), pytest.approx(statistics.stdev(plugin)), 3)
    assert groups[1].accuracy("plugin") == (pytest.approx(0.79), None, 1)
    write_report(workdirs, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    table = md.split("## Across seeds")[1].split("\n## ")[0]
    assert (
        f"| soda (soda-seed0) | fedsoda | 0, 1, 2 | 3 | 83.0 ± {100 * statistics.stdev(plugin):.1f} (n=3) | "
        f"73.0 ± {100 * statistics.stdev(sub):.1f} (n=3) | 50.0 ± 0.0 (n=3) |" in table
    )
    assert "| petuning | fedpetuning | 0 | 1 | 79.0 (n=1) | - | - |" in table


def test_a_seed_that_also_scored_zero_shot_is_in_the_same_group(tmp_path):
    # Which targets eval scored changes no trained artifact; a different eval set size does.
    targets = [["plugin", "sub", "zero-shot"], ["plugin", "sub"], ["plugin", "sub"]]
    accuracy = [{"plugin": 0.80, "sub": 0.7, "zero-shot": 0.5}, {"plugin": 0.82, "sub": 0.7}, {"plugin": 0.84, "sub": 0.7}]
    workdirs = [
        _run(tmp_path, f"soda-seed{k}", _spec("soda", "fedsoda", seed=k, eval={"targets": targets[k]}), accuracy=accuracy[k])
        for k in range(3)
    ]
    workdirs.append(
        _run(
            tmp_path,
            "soda-small-eval",
            _spec("soda", "fedsoda", seed=3, eval={"targets": ["plugin"]}, task={"name": "sst2", "eval_examples": 100}),
            accuracy={"plugin": 0.9},
        )
    )
    runs = [read_run(w) for w in workdirs]
    label_runs(runs)
    groups = seed_groups(runs)
    assert [g.seeds for g in groups] == [[0, 1, 2], [3]]
    assert groups[0].accuracy("plugin") == (pytest.approx(0.82), pytest.approx(0.02), 3)
    assert groups[0].accuracy("zero-shot") == (pytest.approx(0.5), None, 1)


def test_accuracy_curves_average_the_seeds_of_one_spec_round_by_round(tmp_path):
    from fedsoda_cli.compare import accuracy_curves

    evals = [[{"sub": 0.6}, {"sub": 0.8}], [{"sub": 0.7}, {"sub": 0.9}], [{"sub": 0.5}, {"sub": 0.85}]]
    workdirs = [
        _run(tmp_path, f"soda-seed{k}", _spec("soda", "fedsoda", seed=k), rounds=_rounds(50, 50, evals=evals[k]))
        for k in range(3)
    ]
    workdirs.append(_run(tmp_path, "petuning", _spec("petuning", "fedpetuning"), rounds=_rounds(100, 100, evals=evals[0])))
    runs = [read_run(w) for w in workdirs]
    label_runs(runs)
    soda, petuning = accuracy_curves(runs)
    assert (soda.target, soda.seeds, soda.rounds) == ("sub", 3, [1, 2])
    assert soda.mean == pytest.approx([0.6, 0.85]) and soda.low == [0.5, 0.8] and soda.high == [0.7, 0.9]
    cumulative = dict(runs[0].cumulative_communication())  # the seeds spend the same bytes per round
    assert soda.mean_bytes == pytest.approx([cumulative[1], cumulative[2]])
    assert (petuning.seeds, petuning.mean, petuning.low) == (1, [0.6, 0.8], [0.6, 0.8])


def test_accuracy_vs_storage_has_one_point_per_seed_group_and_skips_runs_without_a_plugin_accuracy(tmp_path):
    from fedsoda_cli.compare import storage_points

    plugin = [0.80, 0.86, 0.83]
    workdirs = [
        _run(tmp_path, f"soda-seed{k}", _spec("soda", "fedsoda", seed=k), model_bytes=200, accuracy={"plugin": plugin[k]})
        for k in range(3)
    ]
    workdirs.append(
        _run(tmp_path, "petuning", _spec("petuning", "fedpetuning"), model_bytes=800, accuracy={"plugin": 0.9, "zero-shot": 0.5})
    )
    workdirs.append(_run(tmp_path, "sub-only", _spec("sub-only", "fedsoda"), accuracy={"sub": 0.7}))
    runs = [read_run(w) for w in workdirs]
    label_runs(runs)
    soda, petuning = storage_points(runs)
    assert (soda.seeds, soda.mean, soda.low, soda.high) == (3, pytest.approx(0.83), 0.80, 0.86)
    assert soda.storage_bytes == runs[0].client_storage_bytes and runs[0].client_storage_bytes > 200
    assert (petuning.seeds, petuning.mean, petuning.storage_bytes) == (1, 0.9, runs[3].client_storage_bytes)
    assert petuning.storage_bytes - soda.storage_bytes == 600  # the client models differ by 600 bytes
    files = write_report(workdirs[-1:], tmp_path / "no-plugin")
    assert "accuracy_vs_storage.png" not in [f.name for f in files]


def test_local_runs_report_the_worst_client(tmp_path):
    def local(k, mean, worst):
        per_client = [
            {"client": 0, "accuracy": worst, "ci95": [worst - 0.1, worst + 0.1]},
            {"client": 1, "accuracy": 2 * mean - worst, "ci95": [0.5, 0.9]},
        ]
        return _run(
            tmp_path,
            f"local-seed{k}",
            _spec("local", "local", seed=k),
            accuracy={"sub": mean},
            results_extra={"sub": {"min_accuracy": worst, "per_client": per_client}},
        )

    workdirs = [local(0, 0.70, 0.60), local(1, 0.72, 0.64)]
    runs = [read_run(w) for w in workdirs]
    assert runs[0].min_accuracy == {"sub": 0.60} and [c["client"] for c in runs[0].per_client["sub"]] == [0, 1]
    write_report(workdirs, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "70.0 [65.0, 75.0] (min 60.0)" in md
    table = md.split("## Across seeds")[1].split("\n## ")[0]
    assert "worst client (local)" in table
    assert (
        f"| 71.0 ± {100 * statistics.stdev([0.70, 0.72]):.1f} (n=2) | - | sub 62.0 ± {100 * statistics.stdev([0.6, 0.64]):.1f} (n=2) |"
        in table
    )
    rows = list(csv.DictReader(open(tmp_path / "out" / "report.csv")))
    assert float(rows[1]["min_accuracy_sub"]) == pytest.approx(0.64)


def test_step_time_and_rss_ratios_to_the_nf4_fedpetuning_run(tmp_path):
    bf16 = _run(
        tmp_path,
        "pet-bf16",
        _spec("pet", "fedpetuning", quantize={"quant_type": "none"}),
        rounds=_rounds(1, 1, step=0.05, rss=2000.0),
    )
    nf4 = _run(
        tmp_path,
        "pet-nf4",
        _spec("pet-nf4", "fedpetuning"),
        rounds=[_round(1, 1, 1, step=0.02, rss=900.0), _round(2, 1, 1, step=0.04, rss=1000.0)],
    )
    soda = _run(tmp_path, "soda", _spec("soda", "fedsoda"), rounds=_rounds(1, 1, step=0.015, rss=250.0))
    runs = [read_run(w) for w in (bf16, nf4, soda)]
    label_runs(runs)
    control, why = step_time_control(runs)
    assert control is runs[1] and "nf4" in why
    assert runs[1].step_seconds == pytest.approx(0.03) and runs[1].peak_rss_mb == 1000.0
    write_report([bf16, nf4, soda], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    table = md.split("## Client step time and peak RSS")[1].split("\n## ")[0]
    assert "Ratios to pet-nf4 (fedpetuning, nf4 full model)" in table
    assert "| soda | fedsoda | nf4 | 15.0 ms | 0.50x | 250 MB | 0.25x |" in table
    assert "| pet | fedpetuning | none | 50.0 ms | 1.67x | 2000 MB | 2.00x |" in table
    # without an NF4 fedpetuning run, the first fedpetuning run is the reference, and the report says so
    runs = [read_run(w) for w in (bf16, soda)]
    label_runs(runs)
    control, why = step_time_control(runs)
    assert control is runs[0] and "no nf4 fedpetuning run" in why
    assert step_time_control([runs[1]]) == (None, "")


def test_bad_run_folders_are_named(tmp_path):
    with pytest.raises(ArtifactError, match="no such run folder"):
        read_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no finished stage"):
        read_run(tmp_path / "empty")


def test_a_damaged_round_line_is_named_with_its_file_line_and_field(tmp_path):
    """A metrics.jsonl line that is JSON but not a round record (here with a consistent manifest, so
    the sha256 check lets it through): the error names the file, the line number and the field."""
    workdir = _run(tmp_path, "soda", _spec("soda", "fedsoda"), rounds=_rounds(10, 20), accuracy={"sub": 0.7})
    metrics = workdir / "federate" / "metrics.jsonl"
    first, second = metrics.read_text().splitlines()
    damaged = json.loads(second)
    del damaged["bytes_up"]
    metrics.write_text(first + "\n" + json.dumps(damaged) + "\n")
    manifest_path = workdir / "federate" / artifacts.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["outputs"]["metrics.jsonl"]["sha256"] = artifacts.sha256_file(metrics)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as caught:
        read_run(workdir)
    assert str(caught.value) == (
        f"{metrics}:2: not a round record fedsoda wrote (field 'bytes_up' is missing); rerun `fedsoda federate SPEC --force`"
    )
