"""`fedsoda report` on two hand-built run folders: a FedPETuning baseline and a FedSODA run whose
numbers give known changes (-70 % communication, -75 % storage, +3 accuracy points)."""

from __future__ import annotations

import csv
import json

import pytest

from fedsoda_cli import artifacts
from fedsoda_cli.errors import ArtifactError
from fedsoda_cli.report import baseline_for, change_vs, read_run, write_report


def _stage(workdir, name, files: dict[str, bytes | str], wall: float):
    with artifacts.write_stage(workdir, name, "hash", {}) as writer:
        for rel, content in files.items():
            path = writer.path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    manifest_path = workdir / name / artifacts.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["wall_time_s"] = wall
    manifest_path.write_text(json.dumps(manifest))


def _run(tmp_path, name, method, *, model_bytes, adapter_bytes, totals, rounds, accuracy):
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / "spec.json").write_text(json.dumps({"run": {"name": name, "method": method}, "model": {"name": "tiny-random-llama"}, "task": {"name": "sst2"}}))
    _stage(workdir, "quantize", {"model/model.safetensors": b"x" * model_bytes}, 2.0)
    summary = {"communication": {"totals": totals, "total": sum(totals.values())}, "wall_time_s": 10.0}
    _stage(workdir, "federate", {"adapter/adapter_model.safetensors": b"a" * adapter_bytes, "summary.json": json.dumps(summary),
                                 "metrics.jsonl": "".join(json.dumps(r) + "\n" for r in rounds)}, 10.0)
    results = {t: {"task": "sst2", "metric": "label-word accuracy", "accuracy": a, "correct": int(a * 100), "count": 100,
                   "ci95": [a - 0.05, a + 0.05], "perplexity": 20.0} for t, a in accuracy.items()}
    _stage(workdir, "eval", {"results.json": json.dumps(results)}, 3.0)
    return workdir


def _rounds(down, up, realign=(0, 0), accuracy=None):
    return [{"round": i + 1, "bytes_down": down, "bytes_up": up, "bytes_realign": realign[i],
             **({"accuracy": accuracy[i]} if accuracy else {})} for i in range(2)]


@pytest.fixture
def two_runs(tmp_path):
    baseline = _run(tmp_path, "petuning", "fedpetuning", model_bytes=800, adapter_bytes=200,
                    totals={"model": 1000, "adapter_down": 400, "adapter_up": 400, "realign": 0},
                    rounds=_rounds(200, 200), accuracy={"plugin": 0.80, "sub": 0.78})
    ours = _run(tmp_path, "soda", "fedsoda", model_bytes=200, adapter_bytes=50,
                totals={"model": 250, "adapter_down": 100, "adapter_up": 100, "realign": 90},
                rounds=_rounds(50, 50, (0, 90), accuracy=[0.7, 0.83]), accuracy={"plugin": 0.83, "sub": 0.81, "zero-shot": 0.5})
    return baseline, ours


def test_changes_against_the_fedpetuning_run(two_runs):
    base, ours = read_run(two_runs[0]), read_run(two_runs[1])
    assert (ours.method, ours.model, ours.task) == ("fedsoda", "tiny-random-llama", "sst2")
    assert ours.client_storage_bytes == 250 and base.client_storage_bytes == 1000
    assert ours.communication_total == 540 and base.communication_total == 1800
    assert baseline_for(ours, [base, ours]) is base and baseline_for(base, [base, ours]) is None
    change = change_vs(ours, base)
    assert change["communication_pct"] == pytest.approx(-70.0)
    assert change["communication_rounds_pct"] == pytest.approx(100 * (290 / 800 - 1))
    assert change["storage_pct"] == pytest.approx(-75.0)
    assert change["accuracy_plugin_pts"] == pytest.approx(3.0)
    assert change["accuracy_sub_pts"] == pytest.approx(3.0)
    assert ours.cumulative_communication() == [(0, 250), (1, 350), (2, 540)]
    assert ours.wall_time_s == {"quantize": 2.0, "federate": 10.0, "eval": 3.0}


def test_report_files(two_runs, tmp_path):
    files = write_report(list(two_runs), tmp_path / "report")
    names = sorted(f.name for f in files)
    assert names == ["accuracy_per_round.png", "communication_per_round.png", "report.csv", "report.md"]
    for png in ("accuracy_per_round.png", "communication_per_round.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report" / "report.md").read_text()
    rounds_only = f"{100 * (290 / 800 - 1):+.1f} %"
    assert f"| soda | petuning | -70.0 % | {rounds_only} | -75.0 % | +3.0 pts | +3.0 pts |" in md
    assert "83.0 [78.0, 88.0]" in md and "![accuracy per round](accuracy_per_round.png)" in md
    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "report" / "report.csv"))}
    assert float(rows["soda"]["storage_pct"]) == pytest.approx(-75.0)
    assert rows["soda"]["baseline"] == "petuning" and rows["petuning"]["baseline"] == ""
    assert int(rows["soda"]["communication_realign_bytes"]) == 90
    assert float(rows["soda"]["wall_time_total_s"]) == pytest.approx(15.0)


def test_without_summary_the_rounds_give_the_communication(two_runs, tmp_path):
    # a run whose federate stage wrote no summary.json: adapter traffic from metrics.jsonl, no model download
    workdir = tmp_path / "bare"
    workdir.mkdir()
    _stage(workdir, "federate", {"metrics.jsonl": "".join(json.dumps(r) + "\n" for r in _rounds(10, 20, (0, 5)))}, 1.0)
    run = read_run(workdir)
    assert run.communication == {"adapter_down": 20, "adapter_up": 40, "realign": 5}  # model download unknown
    assert (run.method, run.name) == ("?", "bare") and run.client_storage_bytes is None
    files = write_report([workdir], tmp_path / "out")
    assert "accuracy_per_round.png" not in [f.name for f in files]
    assert "No `fedpetuning` run" in (tmp_path / "out" / "report.md").read_text()


def test_bad_run_folders_are_named(tmp_path):
    with pytest.raises(ArtifactError, match="no such run folder"):
        read_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no finished stage"):
        read_run(tmp_path / "empty")
