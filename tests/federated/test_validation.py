"""Update validation (untrusted client input) and aggregator-output checks (user plugin code)."""

from __future__ import annotations

import pytest
import torch

from fedsoda_cli.errors import PluginError
from fedsoda_cli.federated.messages import adapter_from_bytes, adapter_to_bytes, pack, unpack
from fedsoda_cli.federated.validation import check_aggregate, check_update

GLOBAL = {"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(3, 2)}


def good(**changes):
    adapter = {k: v.clone() + 0.1 for k, v in GLOBAL.items()}
    adapter.update(changes)
    return adapter


def test_a_good_update_passes():
    assert check_update(GLOBAL, good(), max_update_norm=10) is None


@pytest.mark.parametrize(
    "update, reason",
    [
        (good(**{"a.lora_A.weight": torch.full((2, 3), float("nan"))}), "a.lora_A.weight contains NaN or Inf"),
        (good(**{"a.lora_B.weight": torch.tensor([[float("inf"), 0.0]] * 3)}), "a.lora_B.weight contains NaN or Inf"),
        (good(**{"a.lora_A.weight": torch.zeros(3, 2)}), "a.lora_A.weight has shape (3, 2), expected (2, 3)"),
        (good(**{"a.lora_A.weight": torch.zeros(2, 3, dtype=torch.float64)}), "has dtype torch.float64, expected torch.float32"),
        ({"a.lora_A.weight": torch.zeros(2, 3)}, "missing 1 adapter tensor(s), e.g. a.lora_B.weight"),
        (good(**{"b.lora_A.weight": torch.zeros(1)}), "unexpected adapter tensor(s), e.g. b.lora_A.weight"),
        (good(**{"a.lora_A.weight": torch.full((2, 3), 100.0)}), "update norm 245 exceeds federate.max_update_norm = 10"),
    ],
)
def test_bad_updates_are_rejected_with_the_reason(update, reason):
    assert reason in check_update(GLOBAL, update, max_update_norm=10)


def test_aggregate_checks_name_the_aggregator():
    assert check_aggregate("x", GLOBAL, good()) is not None
    for bad, what in [
        ([1, 2], "a list, not a dict"),
        ({"a.lora_A.weight": torch.zeros(2, 3)}, "no tensor 'a.lora_B.weight'"),
        (good(**{"a.lora_A.weight": torch.zeros(6)}), "'a.lora_A.weight' as (6,) torch.float32, expected (2, 3)"),
        (good(**{"a.lora_B.weight": torch.full((3, 2), float("nan"))}), "NaN or Inf in 'a.lora_B.weight'"),
        (good(**{"a.lora_B.weight": [[0.0] * 2] * 3}), "a list for 'a.lora_B.weight', not a tensor"),
    ]:
        with pytest.raises(PluginError, match=f"aggregator 'my-agg' returned .*{what[:20]}"):
            check_aggregate("my-agg", GLOBAL, bad)


def test_messages_round_trip_without_pickle():
    blob = adapter_to_bytes(GLOBAL)
    assert all(torch.equal(adapter_from_bytes(blob)[k], v) for k, v in GLOBAL.items())
    kind, header, payload = unpack(pack("task", {"round": 2, "client": 5}, blob))
    assert (kind, header, payload) == ("task", {"round": 2, "client": 5}, blob)
    with pytest.raises(ValueError, match="not a safetensors adapter"):
        adapter_from_bytes(b"\x80\x04pickle?")
