"""The federate stage on Flower's deployment engine: a real SuperLink and one real SuperNode per
client on 127.0.0.1 (free ports, a private FLWR_HOME, nothing phoning home), the tiny quantized
sub-LLM, and the same spec as a local-backend run.

- two rounds through Flower give the local backend's adapter, round digests and byte accounting,
  each site loads the model once, and no process is left behind;
- a SuperNode killed mid-round: with min_clients = 1 the run finishes with the other client; with
  min_clients = 2 it stops at the last good round with its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from fedsoda_cli import pipeline
from fedsoda_cli.errors import FedsodaError
from fedsoda_cli.federated import console as report
from fedsoda_cli.federated.flower.federation import LoopbackFederation, Site
from fedsoda_cli.federated.flower.shards import write_shards
from fedsoda_cli.spec import load_spec
from tests.federated.conftest import prepare_run

pytestmark = pytest.mark.skipif(
    shutil.which("flower-superlink", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    is None,
    reason="flwr is not installed",
)

# Two clients, both sampled every round, realignment after every round (so realigned layers reach the sites).
# Flower sites always receive the whole realigned layers (they are prepared by its digest), so the
# local reference ships them whole too, for byte-for-byte equal accounting.
OVERRIDES = [
    "federate.clients=2",
    "federate.clients_per_round=2",
    "federate.rounds=2",
    "federate.realign_every=1",
    'federate.realign_wire="full"',
]


def federate(spec, workdir, **options):
    return pipeline.execute(spec, workdir, pipeline.stage_named(spec, "federate"), Console(width=200), **options)


def outputs(workdir):
    out = workdir / "federate"
    return (
        [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
        json.loads((out / "summary.json").read_text()),
    )


def flower_run(folder, sub_llm, overrides=()):
    """A prepared workdir for backend = flower, the sites' shards, and a way to load the spec once
    the SuperLink's address is known. Returns (spec_path, workdir, sites)."""
    spec, workdir, spec_path = prepare_run(folder, sub_llm, [*OVERRIDES, 'federate.backend="flower"', *overrides])
    shards = write_shards(spec, folder / "shards")
    sites = [Site(client, workdir / "quantize" / "model", shard) for client, shard in shards.items()]
    return spec_path, workdir, sites


def spec_for(spec_path, fed, overrides=()):
    return load_spec(
        spec_path,
        [
            *OVERRIDES,
            'federate.backend="flower"',
            *overrides,
            f'federate.flower_superlink="{fed.address}"',
            "federate.flower_connect_timeout_s=120",
        ],
    )


def leftovers(fed) -> list[str]:
    """Processes still running that belong to this federation (its folder or port on their command line)."""
    port = fed.address.rsplit(":", 1)[1]
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        line = " ".join(process.info["cmdline"] or [])
        if process.info["status"] != psutil.STATUS_ZOMBIE and (str(fed.folder) in line or f":{port}" in line):
            found.append(f"{process.pid}: {line}")
    return found


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, sub_llm):
    spec, workdir, _ = prepare_run(tmp_path_factory.mktemp("local"), sub_llm, OVERRIDES)
    federate(spec, workdir)
    return outputs(workdir)


def test_two_rounds_through_flower_match_the_local_backend(tmp_path, sub_llm, local_reference):
    spec_path, workdir, sites = flower_run(tmp_path, sub_llm)
    started = time.perf_counter()
    with LoopbackFederation(sites, tmp_path / "federation") as fed:
        manifest = federate(spec_for(spec_path, fed), workdir)
    seconds = time.perf_counter() - started
    assert leftovers(fed) == []

    lines, summary = outputs(workdir)
    local_lines, local_summary = local_reference
    assert [line["global_digest"] for line in lines] == [line["global_digest"] for line in local_lines]
    for key in ("clients", "updated", "bytes_down", "bytes_up", "bytes_realign", "train_loss"):
        assert [line[key] for line in lines] == [line[key] for line in local_lines], key
    assert summary["bytes"] == local_summary["bytes"] and summary["bytes_per_client"] == local_summary["bytes_per_client"]
    assert summary["model_loads_per_worker"] == {"0": 1, "1": 1}  # one model load per site for the whole run
    assert summary["failed_tasks"] == 0 and manifest.metrics["rounds"] == 2
    wire = summary["wire_bytes"]  # what Flower itself shipped: at least the adapters and layers it carried
    assert (
        wire["down"] >= summary["bytes"]["adapter_down"] + summary["bytes"]["realign"]
        and wire["up"] >= summary["bytes"]["adapter_up"]
    )
    print(
        f"\nflower: {seconds:.1f} s for 2 rounds incl. SuperLink/SuperNode start; rounds {[line['seconds'] for line in lines]} s; "
        f"local rounds {[line['seconds'] for line in local_lines]} s; wire {wire}; accounted {summary['bytes']}"
    )


def _kill_site_when(fed, round_to_kill: int, client: int, monkeypatch):
    """Kill `client`'s SuperNode (and its site worker) as round `round_to_kill` starts: its task is
    then sent to a site that is gone."""
    original = report.ConsoleReporter.round_started

    def round_started(self, round, clients):
        if round == round_to_kill and client in fed.supernodes:
            fed.kill_supernode(client)
        return original(self, round, clients)

    monkeypatch.setattr(report.ConsoleReporter, "round_started", round_started)


def test_killed_supernode_the_run_finishes_with_the_other_client(tmp_path, sub_llm, monkeypatch):
    spec_path, workdir, sites = flower_run(tmp_path, sub_llm, ["federate.realign_every=0"])
    with LoopbackFederation(sites, tmp_path / "federation") as fed:
        _kill_site_when(fed, 1, client=1, monkeypatch=monkeypatch)
        federate(
            spec_for(
                spec_path, fed, ["federate.realign_every=0", "federate.min_clients=1", "federate.flower_round_timeout_s=20"]
            ),
            workdir,
        )
    assert leftovers(fed) == []
    lines, summary = outputs(workdir)
    assert [line["updated"] for line in lines] == [[0], [0]]
    assert [f["client"] for line in lines for f in line["failed"]] == [1, 1]
    assert "did not answer within federate.flower_round_timeout_s = 20 s" in lines[0]["failed"][0]["reason"]


def test_killed_supernode_the_run_stops_at_the_last_good_round(tmp_path, sub_llm, monkeypatch):
    spec_path, workdir, sites = flower_run(tmp_path, sub_llm, ["federate.realign_every=0"])
    with LoopbackFederation(sites, tmp_path / "federation") as fed:
        _kill_site_when(fed, 2, client=0, monkeypatch=monkeypatch)
        spec = spec_for(
            spec_path, fed, ["federate.realign_every=0", "federate.min_clients=2", "federate.flower_round_timeout_s=20"]
        )
        with pytest.raises(FedsodaError, match=r"round 2: only 1 valid client update.*last good round: round 1"):
            federate(spec, workdir)
    assert leftovers(fed) == []
    assert (workdir / "federate.checkpoints" / "round-0001").is_dir()
    assert not (workdir / "federate.checkpoints" / "round-0002").exists()
