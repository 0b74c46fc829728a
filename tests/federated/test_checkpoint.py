"""Round checkpoints: complete or absent, tagged with the run's identity, pruned to the last two."""

from __future__ import annotations

import pytest
import torch

from fedsoda_cli.errors import FedsodaError
from fedsoda_cli.federated.checkpoint import Checkpoint, CheckpointStore, capture_rng, restore_rng
from fedsoda_cli.federated.client import lora_config
from fedsoda_cli.round_record import RoundRecord
from fedsoda_cli.spec.schema import LoraSpec

IDENTITY = {"spec_hash": "abc", "quantize": "q1"}


def checkpoint(round: int) -> Checkpoint:
    return Checkpoint(
        round=round,
        adapter={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.full((4, 8), float(round))},
        aggregator_state={"steps": round, "m.x": torch.ones(3) * round},
        realign_layers=b"layers-bytes" if round > 1 else None,
        realigner_state={"model.layers.2.mlp.up_proj.weight": torch.zeros(2, 2)} if round > 1 else {},
        history=[record(r) for r in range(1, round + 1)],
        ledger={
            "totals": {"model": 10, "adapter_down": 2 * round, "adapter_up": 2 * round, "realign": 0},
            "total": 10 + 4 * round,
            "per_client": {"0": {"model": 10, "adapter_down": 2, "adapter_up": 2, "realign": 0}},
        },
        rng=capture_rng(),
    )


def record(round: int) -> RoundRecord:
    return RoundRecord(
        round=round,
        clients=[0],
        updated=[0],
        excluded=[],
        failed=[],
        train_loss=1.0 / round,
        step_seconds=None,
        train_seconds=0.5,
        train_seconds_by_worker={"0": 0.5},
        worker_rss_mb=300.0,
        global_digest=f"d{round}",
    )


def store(tmp_path, identity=IDENTITY) -> CheckpointStore:
    return CheckpointStore(tmp_path / "federate.checkpoints", identity, lora_config(LoraSpec(r=4)))


def test_latest_round_trips_every_part(tmp_path):
    saving = store(tmp_path)
    for r in (1, 2, 3):
        saving.save(checkpoint(r), "fedadam")
    latest = store(tmp_path).latest()
    expected = checkpoint(3)
    assert latest.round == 3
    assert all(torch.equal(latest.adapter[k], v) for k, v in expected.adapter.items())
    assert latest.aggregator_state["steps"] == 3 and torch.equal(latest.aggregator_state["m.x"], torch.ones(3) * 3)
    assert latest.realign_layers == b"layers-bytes"
    assert set(latest.realigner_state) == {"model.layers.2.mlp.up_proj.weight"}
    assert latest.history == expected.history and latest.ledger == expected.ledger
    assert sorted(p.name for p in saving.folder.glob("round-*")) == ["round-0002", "round-0003"]
    assert (saving.folder / "round-0003" / "adapter" / "adapter_config.json").is_file()


def test_incomplete_checkpoints_are_ignored(tmp_path):
    saving = store(tmp_path)
    saving.save(checkpoint(1), "fedavg")
    (saving.folder / ".round-0002.dead.tmp").mkdir()  # a run killed while writing round 2
    (saving.folder / "round-0002").mkdir()  # no state.json: never completed
    assert store(tmp_path).latest().round == 1


def test_a_checkpoint_of_another_spec_is_refused(tmp_path):
    store(tmp_path).save(checkpoint(2), "fedavg")
    with pytest.raises(FedsodaError, match="different spec or quantize output.*rerun without --resume"):
        store(tmp_path, {"spec_hash": "other", "quantize": "q1"}).latest()
    assert store(tmp_path).clear() == 1 and store(tmp_path).latest() is None


def test_rng_states_restore():
    import random

    import numpy as np

    state = capture_rng()
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(state)
    assert drawn == (random.random(), np.random.rand(), torch.rand(1).item())
