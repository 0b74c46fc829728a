"""What a worker is given (WorkerSetup: typed parts, one JSON form) and gives back (ClientResult)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from fedsoda_cli.federated.client import LocalTraining
from fedsoda_cli.federated.messages import ClientResult, ClientTask, pack, pack_result, pack_task, unpack, unpack_result
from fedsoda_cli.federated.worker import WorkerSetup
from fedsoda_cli.models.adapters import LoraShape

from .conftest import REPO, worker_setup


def _setup(model_dir="model", shards=None) -> WorkerSetup:
    return WorkerSetup(
        model_dir=str(model_dir),
        lora=LoraShape(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]),
        lora_seed=11,
        threads=2,
        training=LocalTraining(
            local_steps=2, batch_size=4, lr=0.01, optimizer="sgd", max_grad_norm=1.0, proximal_mu=0.5, max_len=48, train_eos=False
        ),
        shards=shards if shards is not None else {0: [("p0", "a0"), ("p1", "a1")], 3: [("p2", "a2")]},
        lora_layers=[0, 4],
        wire_dtype="bf16",
    )


def test_worker_setup_survives_its_json_form_exactly(tmp_path):
    setup = _setup()
    assert setup.lora.target_modules == ("q_proj", "v_proj") and setup.lora_layers == (0, 4)  # frozen forms
    again = WorkerSetup.from_json(setup.to_json())
    assert again == setup
    assert isinstance(again.lora, LoraShape) and isinstance(again.training, LocalTraining)
    assert again.lora == setup.lora and again.training == setup.training
    assert all(isinstance(pair, tuple) for pairs in again.shards.values() for pair in pairs)
    assert WorkerSetup.read(setup.write(tmp_path / "setup.json")) == setup
    with pytest.raises(dataclasses.FrozenInstanceError):
        setup.threads = 1

    shared = WorkerSetup.from_json(setup.shared().to_json())  # what a Flower site receives
    assert shared.shards == {} and shared.model_dir == "" and "p0" not in setup.shared().to_json()
    assert dataclasses.replace(shared, model_dir="model", threads=2, shards=setup.shards) == setup
    assert json.loads(setup.to_json())["lora"] == {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


def test_a_worker_setup_does_not_import_torch():
    """A worker reads its setup before it sets its torch threads (OMP_NUM_THREADS must come first)."""
    code = "import sys; import fedsoda_cli.federated.worker; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_a_result_with_adapter_tensors_is_not_framed():
    import torch

    trained = ClientResult(1, 0, {"w": torch.ones(2)}, num_samples=4, metrics={"train_loss": 1.0}, start_digest="d")
    with pytest.raises(TypeError, match="encoded"):
        pack_result(trained)
    wire = trained.encoded("fp32", worker=2)
    kind, header, payload = unpack(pack_result(wire))
    assert kind == "result" and unpack_result(header, payload) == wire
    assert (wire.round, wire.client, wire.num_samples, wire.metrics, wire.start_digest, wire.worker) == (
        1,
        0,
        4,
        {"train_loss": 1.0},
        "d",
        2,
    )


def _trained_twice_in_a_fresh_process(setup: WorkerSetup, task: ClientTask, shard: Path):
    """In a spawned process (no process-wide state of other tests): the task trained by a runtime of
    the in-memory setup (never serialized) and by a Flower site worker prepared with the server's
    shared setup JSON."""
    import torch

    from fedsoda_cli.federated.flower.site import SiteWorker
    from fedsoda_cli.federated.worker import ClientRuntime

    torch.set_num_threads(setup.threads)
    direct = ClientRuntime(setup).handle(task, worker=0)
    site = SiteWorker(task.client, Path(setup.model_dir), shard, threads=setup.threads)
    kind, ready, _ = unpack(site.handle(pack("prepare", {"setup": setup.shared().to_json(), "layers_digest": ""})))
    assert kind == "ready", ready
    kind, header, payload = unpack(site.handle(pack_task(task)))
    assert kind == "result", header
    return direct, unpack_result(header, payload)


def test_a_worker_process_trains_the_same_adapter_as_the_unserialized_setup(tmp_path, client_model_dir, shards):
    from fedsoda_cli.federated.local import LocalWorkerPool

    setup = dataclasses.replace(worker_setup(client_model_dir, shards), lora_layers=[0, 4])
    pool = LocalWorkerPool(setup, workers=1, task_timeout_s=300, log=lambda line: None)  # reads setup.json
    try:
        pool.start()
        task = ClientTask(round=1, client=2, seed=7, adapter=pool.initial_adapter())
        [pooled] = list(pool.run_tasks([task]))
    finally:
        pool.close()
    shard = tmp_path / "shard.jsonl"
    shard.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in shards[2]))
    with multiprocessing.get_context("spawn").Pool(1) as fresh:
        direct, sited = fresh.apply(_trained_twice_in_a_fresh_process, (setup, task, shard))

    assert isinstance(pooled, ClientResult), pooled
    for other in (direct, sited):
        assert other.adapter == pooled.adapter  # bit-identical serialized adapters
        assert (other.round, other.client, other.num_samples, other.start_digest) == (1, 2, 8, pooled.start_digest)
        assert other.metrics["train_loss"] == pooled.metrics["train_loss"]
