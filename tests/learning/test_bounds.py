"""The reference runs on the same synthetic task as test_learning: central (pooled data, the same
steps and examples) must learn it, local (each client alone) reports every client and its worst."""

from __future__ import annotations

import json

from .test_learning import run_pipeline


def test_central_pools_the_data_and_does_the_federations_work(tmp_path):
    run = run_pipeline(
        tmp_path, "run.method=central", "federate.partition=dirichlet", "federate.dirichlet_alpha=0.5", "federate.rounds=5"
    )
    assert run["results"]["plugin"]["accuracy"] >= 0.9 and run["results"]["sub"]["accuracy"] >= 0.9
    partition = json.loads((tmp_path / "work" / "federate" / "partition.json").read_text())
    assert partition["clients"] == 1 and partition["per_client"][0]["size"] == 96  # every training example, one client
    assert all(r["updated"] == [0] for r in run["rounds"]) and len(run["rounds"]) == 5


def test_local_trains_every_client_alone_and_reports_the_worst(tmp_path):
    folder = tmp_path / "local"
    assert (
        run_pipeline(
            folder,
            "run.method=local",
            "federate.partition=dirichlet",
            "federate.dirichlet_alpha=0.5",
            "federate.eval_every=0",
            "federate.rounds=3",
        )["rounds"]
        == []
    )
    work = folder / "work"
    results = json.loads((work / "eval" / "results.json").read_text())
    for target in ("plugin", "sub"):
        per_client = results[target]["per_client"]
        assert [c["client"] for c in per_client] == [0, 1, 2, 3]
        accuracies = [c["accuracy"] for c in per_client]
        assert results[target]["min_accuracy"] == min(accuracies)
        assert abs(results[target]["accuracy"] - sum(accuracies) / 4) < 1e-12
    # each client's adapter is plugged in at the spec's scale, which the run then records once
    assert [c["plugin_scale"]["scale"] for c in results["plugin"]["per_client"]] == [1.0] * 4
    assert results["plugin"]["plugin_scale"] == {"scale": 1.0, "chosen_on": "spec", "candidates": []}
    summary = json.loads((work / "federate" / "summary.json").read_text())
    assert summary["bytes"]["adapter_up"] == 0 and summary["bytes"]["total"] == summary["bytes"]["model"] > 0
    for client in range(4):
        lines = (work / "federate" / "clients" / f"client-{client}" / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 3 and all(json.loads(line)["updated"] == [0] for line in lines)
