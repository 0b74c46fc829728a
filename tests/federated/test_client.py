"""A client's local training: isolation between clients sharing one model, determinism, FedProx."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsoda_cli.data.tasks import Example
from fedsoda_cli.federated.client import LocalTraining, adapter_state, batch_order, load_client, train_client
from fedsoda_cli.federated.messages import adapter_digest
from fedsoda_cli.federated.server import sample_clients

from .conftest import TRAINING


@pytest.fixture(scope="module")
def client(client_model_dir):
    return load_client(client_model_dir, _lora(), seed=11)


def _lora():
    from fedsoda_cli.spec.schema import LoraSpec

    return LoraSpec(r=4, alpha=8)


def _shard(shards, client):
    return [Example(f"c{client}-{i}", p, a, None, None) for i, (p, a) in enumerate(shards[client])]


def _distance(a, b) -> float:
    return sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5


def test_clients_sharing_a_model_never_start_from_each_others_weights(client, shards):
    model, tokenizer = client
    config = LocalTraining(**TRAINING)
    global_adapter = adapter_state(model)
    first_a = train_client(model, tokenizer, global_adapter, _shard(shards, 0), config, seed=100)
    b = train_client(model, tokenizer, global_adapter, _shard(shards, 1), config, seed=200)
    again_a = train_client(model, tokenizer, global_adapter, _shard(shards, 0), config, seed=100)
    start = adapter_digest(global_adapter)
    assert first_a.start_digest == b.start_digest == again_a.start_digest == start
    # B ran in between, on the same model and after A's optimizer: A repeats bit for bit anyway.
    assert adapter_digest(first_a.adapter) == adapter_digest(again_a.adapter)
    assert adapter_digest(first_a.adapter) != adapter_digest(b.adapter) != start
    assert first_a.num_samples == len(shards[0])
    assert np.isfinite(first_a.metrics["train_loss"])


def test_proximal_term_keeps_the_update_near_the_global_adapter(client, shards):
    model, tokenizer = client
    global_adapter = adapter_state(model)
    free = train_client(
        model,
        tokenizer,
        global_adapter,
        _shard(shards, 2),
        LocalTraining(**{**TRAINING, "proximal_mu": 0.0, "local_steps": 4}),
        5,
    )
    held = train_client(
        model,
        tokenizer,
        global_adapter,
        _shard(shards, 2),
        LocalTraining(**{**TRAINING, "proximal_mu": 1e4, "local_steps": 4}),
        5,
    )
    assert _distance(held.adapter, global_adapter) < 0.5 * _distance(free.adapter, global_adapter)


def test_sgd_changes_only_lora_tensors(client, shards):
    model, tokenizer = client
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()}
    global_adapter = adapter_state(model)
    result = train_client(
        model, tokenizer, global_adapter, _shard(shards, 3), LocalTraining(**{**TRAINING, "optimizer": "sgd"}), 9
    )
    assert set(result.adapter) == set(global_adapter)
    assert _distance(result.adapter, global_adapter) > 0
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)


def test_batch_order_is_seeded_and_passes_over_the_whole_shard():
    order = batch_order(5, 12, np.random.default_rng(3))
    assert order == batch_order(5, 12, np.random.default_rng(3))
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5))
    assert len(order) == 12


def test_client_sampling_is_a_function_of_seed_and_round():
    picks = [sample_clients(7, r, 10, 4) for r in range(1, 21)]
    assert picks == [sample_clients(7, r, 10, 4) for r in range(1, 21)]
    assert all(p == sorted(set(p)) and len(p) == 4 and 0 <= p[0] and p[-1] < 10 for p in picks)
    assert len({tuple(p) for p in picks}) > 10  # rounds differ
    assert picks != [sample_clients(8, r, 10, 4) for r in range(1, 21)]  # seeds differ
    assert sample_clients(7, 3, 5, 5) == [0, 1, 2, 3, 4]


def test_lora_layers_put_the_adapter_on_those_original_layers_only(client_model_dir, tmp_path):
    from peft import PeftModel

    from fedsoda_cli.errors import SpecError
    from fedsoda_cli.federated.checkpoint import write_peft_adapter
    from fedsoda_cli.federated.client import lora_config
    from fedsoda_cli.models.adapters import layer_index
    from fedsoda_cli.models.quantized import load_client_model
    from fedsoda_cli.spec import Spec
    from fedsoda_cli.stages.federate import client_lora_layers, decoder_layers_name

    from .conftest import LAYER_MAP

    spec = Spec.model_validate({"lora": {"r": 4, "alpha": 8, "layers": [5, 0]}})
    layers = client_lora_layers(spec, LAYER_MAP)
    assert layers == [0, 4]  # kept = [0, 1, 2, 4, 5]: original 5 is client layer 4
    with pytest.raises(SpecError, match=r"lora.layers: original layer\(s\) \[3\] were pruned away"):
        client_lora_layers(Spec.model_validate({"lora": {"layers": [3]}}), LAYER_MAP)
    model, _ = load_client(client_model_dir, spec.lora, seed=11, layers=layers)
    adapter = adapter_state(model)
    assert {layer_index(name) for name in adapter} == {0, 4}
    write_peft_adapter(tmp_path / "adapter", adapter, lora_config(spec.lora, layers, decoder_layers_name(client_model_dir)))
    base, _ = load_client_model(client_model_dir)
    assert adapter_digest(adapter_state(PeftModel.from_pretrained(base, tmp_path / "adapter"))) == adapter_digest(adapter)
