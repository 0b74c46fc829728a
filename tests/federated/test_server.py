"""The round loop on the inline backend (clients train in this process): exclusion of poisoned
updates, state-leak detection, plugin errors, stopping short, and realign + resume."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from fedsoda_cli.errors import FedsodaError, PluginError
from fedsoda_cli.federated.checkpoint import CheckpointStore
from fedsoda_cli.federated.client import lora_config
from fedsoda_cli.federated.console import ConsoleReporter
from fedsoda_cli.federated.inline import InlineTransport
from fedsoda_cli.federated.messages import adapter_digest, adapter_from_bytes, adapter_to_bytes
from fedsoda_cli.federated.server import FederatedServer, RoundPlan
from fedsoda_cli.plugins import Aggregator, aggregators
from fedsoda_cli.round_record import RoundRecord
from fedsoda_cli.spec.schema import LoraSpec

from .conftest import LAYER_MAP, worker_setup

IDENTITY = {"spec_hash": "test", "quantize": "test"}


class Tampering(InlineTransport):
    """The inline backend with a man in the middle that rewrites chosen clients' uploads."""

    def __init__(self, setup, tamper):
        super().__init__(setup)
        self.tamper = tamper  # client -> function(result) -> None, changes the result in place
        self.uploaded = 0

    def run_tasks(self, tasks):
        for outcome in super().run_tasks(tasks):
            if outcome.client in self.tamper:
                self.tamper[outcome.client](outcome)
            self.uploaded += len(outcome.adapter)
            yield outcome


def rewrite(change):
    """A tamper function that edits the uploaded adapter tensors with `change(dict)`."""

    def apply(result):
        adapter = adapter_from_bytes(result.adapter)
        change(adapter)
        result.adapter = adapter_to_bytes(adapter)

    return apply


def first_key(adapter):
    return sorted(adapter)[0]


POISON = {
    1: rewrite(lambda a: a[first_key(a)].fill_(float("nan"))),
    2: rewrite(lambda a: a.__setitem__(first_key(a), torch.zeros(3, 3))),
    3: rewrite(lambda a: a[first_key(a)].fill_(1e6)),
    4: rewrite(lambda a: a.pop(first_key(a))),
    5: lambda result: setattr(result, "adapter", b"not safetensors"),
}


def server(tmp_path, setup, *, transport=None, aggregator="fedavg", console=None, realigner=None, **plan):
    plan = RoundPlan(**{"seed": 1, "clients": 6, "clients_per_round": 6, "rounds": 1, **plan})
    store = CheckpointStore(tmp_path / "ckpt", IDENTITY, lora_config(LoraSpec(r=4, alpha=8)))
    reporter = ConsoleReporter(console) if console else None
    return FederatedServer(
        plan,
        transport or InlineTransport(setup),
        aggregators.create(aggregator, seed=0),
        aggregator,
        store,
        realigner=realigner,
        reporter=reporter,
        model_bytes=1000,
    )


@pytest.fixture(scope="module")
def setup(client_model_dir, shards):
    return worker_setup(client_model_dir, shards)


def test_poisoned_updates_are_excluded_with_the_client_named(tmp_path, setup):
    console = Console(record=True, width=200)
    transport = Tampering(setup, POISON)
    result = server(tmp_path, setup, transport=transport, console=console).run()
    record = result.history[0]
    assert record.updated == [0]
    reasons = {e.client: e.reason for e in record.excluded}
    assert "contains NaN or Inf" in reasons[1]
    assert "has shape (3, 3)" in reasons[2]
    assert "exceeds federate.max_update_norm" in reasons[3]
    assert "missing 1 adapter tensor" in reasons[4]
    assert "unreadable upload" in reasons[5]
    text = console.export_text()
    assert "round 1: client 1 excluded: " in text and "round 1: client 5 excluded: unreadable upload" in text
    # Excluded uploads still crossed the network: every client's upload is counted.
    assert result.ledger.totals["adapter_up"] == transport.uploaded
    assert result.ledger.totals["adapter_down"] == 6 * len(adapter_to_bytes(result.adapter))
    assert result.ledger.totals["model"] == 6 * 1000
    assert result.transport["model_loads"] == {0: 1}


def test_a_client_that_did_not_start_from_the_global_adapter_is_excluded(tmp_path, setup):
    leak = {2: lambda result: setattr(result, "start_digest", "0123456789abcdef")}
    record = server(tmp_path, setup, transport=Tampering(setup, leak), clients=3, clients_per_round=3).run().history[0]
    assert [e.client for e in record.excluded] == [2]
    assert "client state leaked" in record.excluded[0].reason


def test_too_few_valid_updates_stop_the_run_at_the_last_good_round(tmp_path, setup):
    poison_round_2 = {c: (lambda result, f=POISON[c]: f(result) if result.round == 2 else None) for c in (1, 2)}
    run = server(
        tmp_path, setup, transport=Tampering(setup, poison_round_2), clients=3, clients_per_round=3, rounds=3, min_clients=2
    )
    with pytest.raises(
        FedsodaError,
        match=r"round 2: only 1 valid client update.*min_clients = 2.*client 1: .*NaN.*last good round: round 1.*--resume",
    ):
        run.run()
    assert run.store.latest().round == 1


@aggregators.register("test-raises")
class Raises(Aggregator):
    def aggregate(self, round, global_adapter, updates):
        raise ValueError("boom")


@aggregators.register("test-wrong-shape")
class WrongShape(Aggregator):
    def aggregate(self, round, global_adapter, updates):
        return {k: v.flatten() for k, v in global_adapter.items()}


@aggregators.register("test-bad-state")
class BadState(Aggregator):
    def aggregate(self, round, global_adapter, updates):
        return dict(updates[0].adapter)

    def state_dict(self):
        return {"nested": {"x": torch.zeros(1)}}


@pytest.mark.parametrize(
    "name, message",
    [
        ("test-raises", r"aggregator 'test-raises' \(tests\.federated\.test_server\) raised ValueError in aggregate\(\): boom"),
        ("test-wrong-shape", r"aggregator 'test-wrong-shape' returned '.*' as \(\d+,\) torch.float32, expected"),
        ("test-bad-state", r"aggregator 'test-bad-state' state_dict\(\) must hold only tensors and JSON values"),
    ],
)
def test_a_broken_aggregator_gives_a_plugin_error_naming_it(tmp_path, setup, name, message):
    with pytest.raises(PluginError, match=message):
        server(tmp_path, setup, aggregator=name, clients_per_round=1).run()


def _realign_spec():
    from fedsoda_cli.spec import Spec

    return Spec.model_validate(
        {
            "run": {"seed": 1},
            "model": {"name": "tiny-random-llama"},
            "public_data": {"sequences": 4, "seq_len": 16, "heldout_sequences": 1},
            "align": {"batch_size": 2},
            "realign": {"steps": 2},
            "lora": {"r": 4, "alpha": 8},
        }
    )


def _run(tmp_path, setup, sub_llm, rounds, *, realign=True, resume=False, stop_in=None):
    """A realigning run; `stop_in` = a round whose every upload is poisoned, so the run stops after the one before."""
    from fedsoda_cli.federated.realigner import ServerRealigner
    from fedsoda_cli.oda.realign import RealignConfig

    realigner = ServerRealigner(RealignConfig.from_spec(_realign_spec()), sub_llm["float"], LAYER_MAP) if realign else None
    poison = {c: (lambda result: POISON[1](result) if result.round == stop_in else None) for c in range(4)}
    run = server(
        tmp_path,
        setup,
        realigner=realigner,
        rounds=rounds,
        clients=4,
        clients_per_round=2,
        realign_every=1 if realign else 0,
        transport=Tampering(setup, poison) if stop_in else None,
    )
    return run.run(run.store.latest() if resume else None)


def test_realign_broadcasts_layers_and_a_resumed_run_repeats_it_exactly(tmp_path, setup, sub_llm):
    whole = _run(tmp_path / "whole", setup, sub_llm, rounds=3)  # realigns after rounds 1 and 2, not after the last
    with pytest.raises(FedsodaError, match="round 2: only 0 valid"):
        _run(tmp_path / "split", setup, sub_llm, rounds=3, stop_in=2)
    resumed = _run(tmp_path / "split", setup, sub_llm, rounds=3, resume=True)  # restores layers + master copy
    plain = _run(tmp_path / "plain", setup, sub_llm, rounds=3, realign=False)

    assert resumed.resumed_after == 1
    assert adapter_digest(resumed.adapter) == adapter_digest(whole.adapter)
    assert resumed.realign_layers == whole.realign_layers  # the master copy carried over exactly
    assert [h.global_digest for h in resumed.history] == [h.global_digest for h in whole.history]
    realign_bytes = [h.bytes_realign for h in whole.history]
    assert realign_bytes[0] > 0 and realign_bytes[0] % 4 == 0  # every one of the K = 4 clients downloads it
    assert realign_bytes[1] == 4 * len(whole.realign_layers)
    assert realign_bytes[2] == 0  # no round follows the last: realigning then would only cost bytes
    assert whole.ledger.totals["realign"] == sum(realign_bytes)
    from safetensors.torch import load

    sent = load(whole.realign_layers)
    assert any(
        k.startswith("model.layers.3.") and k.endswith(".weight.absmax") for k in sent
    )  # sub layer 3 = original 4, after the gap
    assert not any(k.startswith("model.layers.1.") for k in sent)  # only the partial layers travel
    # Clients trained on the realigned layers from round 2 on: the runs part ways exactly there.
    assert plain.history[0].global_digest == whole.history[0].global_digest
    assert plain.history[1].global_digest != whole.history[1].global_digest


@pytest.mark.parametrize("weighting, expected", [("examples", [8, 8]), ("shard", [3, 30]), ("uniform", [1, 1])])
def test_aggregation_weight_follows_federate_weighting(weighting, expected):
    from fedsoda_cli.federated.messages import ClientResult

    plan = RoundPlan(seed=0, clients=2, clients_per_round=2, rounds=1, weighting=weighting)
    loop = FederatedServer(plan, transport=None, aggregator=None, aggregator_name="fedavg", store=None)
    # both clients did the same work (8 examples) on shards of very different sizes
    results = [ClientResult(1, c, b"", num_samples=8, metrics={"shard_size": size}) for c, size in ((0, 3), (1, 30))]
    assert [loop.weight(r) for r in results] == expected


def test_workers_report_the_examples_they_trained_on_and_their_shard(tmp_path, setup):
    seen = []
    transport = Tampering(setup, {c: seen.append for c in (0, 1)})
    record = server(tmp_path, setup, transport=transport, clients=2, clients_per_round=2).run().history[0]
    assert record.step_seconds > 0
    assert [r.num_samples for r in seen] == [2 * 4, 2 * 4]  # local_steps x batch_size, not the shard's 8
    assert [r.metrics["shard_size"] for r in seen] == [8, 8]


@pytest.mark.parametrize("wire", ["bf16", "fp16"])
def test_a_narrow_wire_halves_adapter_bytes_and_keeps_an_fp32_master(tmp_path, setup, wire):
    import dataclasses

    from safetensors.torch import load

    uploads = {"fp32": [], wire: []}
    results = {}
    for dtype in ("fp32", wire):
        narrow = dataclasses.replace(setup, wire_dtype=dtype)
        transport = Tampering(narrow, {c: (lambda r, d=dtype: uploads[d].append(r.adapter)) for c in (0, 1)})
        results[dtype] = server(
            tmp_path / dtype, narrow, transport=transport, clients=2, clients_per_round=2, wire_dtype=dtype
        ).run()
    wide, thin = results["fp32"], results[wire]
    assert thin.history[0].updated == [0, 1] and not thin.history[0].excluded  # clients start from the rounded global
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}[wire]
    assert all(t.dtype == expected for blob in uploads[wire] for t in load(blob).values())
    assert all(t.dtype == torch.float32 for t in thin.adapter.values())  # the master stays fp32
    assert 0.5 < thin.ledger.totals["adapter_down"] / wide.ledger.totals["adapter_down"] < 0.6  # half the data, the same header
    assert 0.5 < thin.ledger.totals["adapter_up"] / wide.ledger.totals["adapter_up"] < 0.6
    # The same training from rounded starting points: close, not equal.
    diff = torch.cat([(thin.adapter[n] - t).reshape(-1) for n, t in wide.adapter.items()]).norm()
    norm = torch.cat([t.reshape(-1) for t in wide.adapter.values()]).norm()
    assert 0 < diff / norm < 0.02


class Keeping(InlineTransport):
    """The inline backend, keeping its client model after the run for inspection."""

    def close(self) -> None:
        self.kept = self.runtime
        super().close()


def test_a_client_that_applies_the_realign_delta_ends_bit_identical_to_a_redownload(tmp_path, setup, sub_llm, client_model_dir):
    from safetensors.torch import load

    from fedsoda_cli.federated.layer_delta import HeldLayers
    from fedsoda_cli.federated.realigner import ServerRealigner
    from fedsoda_cli.federated.worker import ClientRuntime
    from fedsoda_cli.models.quantized import WEIGHTS, client_state_dict
    from fedsoda_cli.oda.realign import RealignConfig

    runs = {}
    for wire in ("full", "delta"):
        transport = Keeping(setup)
        plan = RoundPlan(seed=1, clients=4, clients_per_round=2, rounds=3, realign_every=1)
        store = CheckpointStore(tmp_path / wire / "ckpt", IDENTITY, lora_config(LoraSpec(r=4, alpha=8)))
        held = HeldLayers(client_model_dir / WEIGHTS) if wire == "delta" else None
        loop = FederatedServer(
            plan,
            transport,
            aggregators.create("fedavg", seed=0),
            "fedavg",
            store,
            model_bytes=1000,
            realigner=ServerRealigner(RealignConfig.from_spec(_realign_spec()), sub_llm["float"], LAYER_MAP),
            held_layers=held,
        )
        runs[wire] = (loop.run(), transport.kept)
    (full, _), (delta, delta_client) = runs["full"], runs["delta"]
    # The same training on the same layers: every round's global adapter is bit-identical.
    assert [h.global_digest for h in delta.history] == [h.global_digest for h in full.history]
    assert delta.realign_layers == full.realign_layers
    # Cheaper: only the changed chunks travel (the first realign changes more than the second).
    assert 0 < delta.history[0].bytes_realign < full.history[0].bytes_realign
    assert 0 < delta.history[1].bytes_realign < full.history[1].bytes_realign
    # The client that applied two deltas holds, tensor for tensor and bit for bit, the layers of a
    # fresh client model that downloaded the latest whole layers.
    fresh = ClientRuntime(setup)
    fresh.apply_layers(full.realign_layers)
    base_only = lambda state: {k: v for k, v in state.items() if "lora_" not in k}  # noqa: E731  (adapters differ: trained vs fresh)
    ours, theirs = base_only(client_state_dict(delta_client.model)), base_only(client_state_dict(fresh.model))
    assert ours.keys() == theirs.keys()
    changed = set(load(full.realign_layers))
    assert any(k in ours for k in changed)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(
            ours[key].view(torch.uint8) if ours[key].is_floating_point() else ours[key],
            theirs[key].view(torch.uint8) if theirs[key].is_floating_point() else theirs[key],
        ), key


def _drift_spec(threshold: float):
    from fedsoda_cli.spec import Spec

    spec = _realign_spec()
    return Spec.model_validate(
        {
            **spec.model_dump(),
            "federate": {
                **spec.federate.model_dump(),
                "realign_when": "drift",
                "drift_threshold": threshold,
                "drift_sequences": 2,
            },
        }
    )


@pytest.mark.parametrize("threshold", [1.0 + 1e-9, 1e9])
def test_drift_triggered_realignment_realigns_exactly_when_drift_passes_the_threshold(tmp_path, setup, sub_llm, threshold):
    from fedsoda_cli.federated.realigner import ServerRealigner
    from fedsoda_cli.oda.realign import RealignConfig

    def run(folder, when, realigner):
        plan = RoundPlan(
            seed=1, clients=4, clients_per_round=2, rounds=4, realign_every=1, realign_when=when, drift_threshold=threshold
        )
        store = CheckpointStore(tmp_path / folder, IDENTITY, lora_config(LoraSpec(r=4, alpha=8)))
        return FederatedServer(
            plan,
            InlineTransport(setup),
            aggregators.create("fedavg", seed=0),
            "fedavg",
            store,
            realigner=realigner,
            model_bytes=1000,
        ).run()

    result = run("drift", "drift", ServerRealigner(RealignConfig.from_spec(_drift_spec(threshold)), sub_llm["float"], LAYER_MAP))
    drifts = [h.drift for h in result.history]
    assert all(d.kl > 0 and d.ratio == pytest.approx(d.kl / d.reference) and d.threshold == threshold for d in drifts)
    realigned = [h.round for h in result.history if h.bytes_realign]
    assert realigned == [h.round for h, d in zip(result.history, drifts) if d.ratio > threshold and h.round < 4]
    for h, d in zip(result.history, drifts):  # after a realignment, the reference is the drift under the new layers
        assert (d.after_realign is not None) == (h.round in realigned)
    later = [(d, nxt) for d, nxt in zip(drifts, drifts[1:]) if d.after_realign is not None]
    assert all(nxt.reference == d.after_realign for d, nxt in later)
    assert [RoundRecord.from_json(json.loads(json.dumps(h.to_json()))) for h in result.history] == result.history
    if threshold > 1e6:
        # Never realigned: measuring drift changed nothing about training.
        plain = run("plain", "every", None)
        assert realigned == [] and [h.global_digest for h in result.history] == [h.global_digest for h in plain.history]
    else:
        assert realigned  # the adapter trains away from the aligned layers, so drift grows past 1x


def test_report_plots_the_drift_the_server_wrote(tmp_path, setup, sub_llm):
    from fedsoda_cli.compare import DRIFT_PNG, read_run, write_report
    from fedsoda_cli.federated.realigner import ServerRealigner
    from fedsoda_cli.oda.realign import RealignConfig
    from tests.test_report import _run as report_run
    from tests.test_report import _spec as report_spec

    plan = RoundPlan(seed=1, clients=4, clients_per_round=2, rounds=2, realign_every=1, realign_when="drift", drift_threshold=1.5)
    store = CheckpointStore(tmp_path / "ckpt", IDENTITY, lora_config(LoraSpec(r=4, alpha=8)))
    history = (
        FederatedServer(
            plan,
            InlineTransport(setup),
            aggregators.create("fedavg", seed=0),
            "fedavg",
            store,
            model_bytes=1000,
            realigner=ServerRealigner(RealignConfig.from_spec(_drift_spec(1.5)), sub_llm["float"], LAYER_MAP),
        )
        .run()
        .history
    )
    spec = report_spec("drifting", "fedsoda", federate={"realign_when": "drift", "drift_threshold": 1.5})
    workdir = report_run(tmp_path, "drifting", spec, rounds=history, accuracy={"plugin": 0.5})
    assert [p[0] for p in read_run(workdir).drift_rounds()] == [1, 2]
    files = write_report([workdir], tmp_path / "report")
    assert tmp_path / "report" / DRIFT_PNG in files and (tmp_path / "report" / DRIFT_PNG).stat().st_size > 1000
