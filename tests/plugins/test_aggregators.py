"""Aggregators on hand-made updates: FedAvg arithmetic, the plugins/ examples, registry lookups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsoda_cli.errors import PluginError
from fedsoda_cli.plugins import ClientUpdate, aggregators, load_plugin_files
from fedsoda_cli.plugins.aggregators.fedavg import FedAvg

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = ["plugins/fedadam.py", "plugins/fedyogi.py", "plugins/trimmed_mean.py", "plugins/median.py"]


@pytest.fixture(scope="module", autouse=True)
def _examples():
    load_plugin_files(EXAMPLES, REPO)


def update(client: int, value: float | list[float], n: int = 1) -> ClientUpdate:
    """A one-tensor adapter {"w": [value...]} (float32) from `client` with `n` samples."""
    values = value if isinstance(value, list) else [value, value]
    return ClientUpdate(client, {"w": torch.tensor(values, dtype=torch.float32)}, n)


GLOBAL = {"w": torch.zeros(2, dtype=torch.float32)}


def test_fedavg_weights_by_samples():
    # (1 * 1 + 3 * 5) / (1 + 3) = 4 ; (1 * 2 + 3 * -2) / 4 = -1
    new = FedAvg().aggregate(1, GLOBAL, [update(0, [1.0, 2.0], n=1), update(1, [5.0, -2.0], n=3)])
    assert new["w"].tolist() == [4.0, -1.0]
    assert new["w"].dtype == torch.float32


def test_fedavg_equal_weights_is_plain_mean_and_keeps_inputs():
    updates = [update(0, 1.0, 2), update(1, 2.0, 2), update(2, 6.0, 2)]
    before = [u.adapter["w"].clone() for u in updates]
    new = FedAvg().aggregate(1, GLOBAL, updates)
    assert new["w"].tolist() == [3.0, 3.0]
    assert all(torch.equal(u.adapter["w"], b) for u, b in zip(updates, before))
    assert GLOBAL["w"].tolist() == [0.0, 0.0]


def test_fedavg_all_zero_samples_falls_back_to_equal_weights():
    assert FedAvg().aggregate(1, GLOBAL, [update(0, 2.0, 0), update(1, 4.0, 0)])["w"].tolist() == [3.0, 3.0]


OUTLIER = [update(0, 1.0), update(1, 2.0), update(2, 3.0), update(3, 4.0), update(4, 1000.0)]


def test_median_and_trimmed_mean_resist_one_outlier():
    assert FedAvg().aggregate(1, GLOBAL, OUTLIER)["w"][0] == pytest.approx(202.0)
    assert aggregators.create("median", seed=0).aggregate(1, GLOBAL, OUTLIER)["w"].tolist() == [3.0, 3.0]
    trimmed = aggregators.create("trimmed_mean", seed=0, trim=0.2).aggregate(1, GLOBAL, OUTLIER)
    assert trimmed["w"].tolist() == [3.0, 3.0]  # drops 1 and 1000, averages 2, 3, 4


def test_median_of_even_count_averages_the_middle_pair():
    four = [update(0, 1.0), update(1, 2.0), update(2, 4.0), update(3, 100.0)]
    assert aggregators.create("median", seed=0).aggregate(1, GLOBAL, four)["w"].tolist() == [3.0, 3.0]


def test_trimmed_mean_keeps_at_least_one_value():
    two = [update(0, 1.0), update(1, 3.0)]
    assert aggregators.create("trimmed_mean", seed=0, trim=0.49).aggregate(1, GLOBAL, two)["w"].tolist() == [2.0, 2.0]
    with pytest.raises(PluginError, match="trimmed_mean.*trim must be in"):
        aggregators.create("trimmed_mean", seed=0, trim=0.5)


def test_fedadam_first_step_by_hand():
    lr, tau = 0.1, 1e-3
    adam = aggregators.create("fedadam", seed=0, server_lr=lr, tau=tau)
    delta = 2.0  # both clients moved to 2.0 from 0.0
    new = adam.aggregate(1, GLOBAL, [update(0, delta), update(1, delta)])
    m = 0.1 * delta
    v = 0.99 * tau**2 + 0.01 * delta**2
    assert new["w"][0].item() == pytest.approx(lr * m / (v**0.5 + tau), rel=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimizer_state_round_trip(name, tmp_path):
    from fedsoda_cli.federated.checkpoint import read_state, write_state

    first = aggregators.create(name, seed=0, server_lr=0.05)
    theta = dict(GLOBAL)
    for r, values in enumerate([[1.0, -1.0], [0.5, 2.0]], start=1):
        theta = first.aggregate(r, theta, [update(0, [v + float(theta["w"][i]) for i, v in enumerate(values)], 3)])
    write_state(tmp_path, "agg", first.state_dict(), name)  # as a checkpoint stores it
    second = aggregators.create(name, seed=0, server_lr=0.05)
    second.load_state_dict(read_state(tmp_path, "agg"))
    last = [update(0, [3.0, 3.0], 1), update(1, [-1.0, 0.0], 2)]
    assert torch.equal(first.aggregate(3, theta, last)["w"], second.aggregate(3, theta, last)["w"])
    assert second.steps == 3


def test_fedyogi_differs_from_fedadam_after_a_large_then_small_update():
    adam, yogi = aggregators.create("fedadam", seed=0), aggregators.create("fedyogi", seed=0)
    for agg in (adam, yogi):
        theta = agg.aggregate(1, GLOBAL, [update(0, 5.0)])
        theta = agg.aggregate(2, theta, [update(0, float(theta["w"][0]) + 0.01)])
        agg.last = theta["w"][0].item()
    assert adam.last != pytest.approx(yogi.last, rel=1e-9)


def test_unknown_aggregator_suggests_the_closest_name():
    with pytest.raises(PluginError, match=r"unknown aggregator 'fedavgg' \(did you mean 'fedavg'"):
        aggregators.get("fedavgg")
    with pytest.raises(PluginError, match="did you mean 'fedadam'"):
        aggregators.get("fedadm")


def test_bad_option_names_the_aggregator():
    with pytest.raises(PluginError, match="aggregator 'fedavg'.*failed to start.*trim"):
        aggregators.create("fedavg", seed=0, trim=0.1)


def test_fedavgm_without_momentum_is_fedavg():
    from fedsoda_cli.plugins.aggregators.fedavgm import FedAvgM

    updates = [update(0, [1.0, 2.0], n=1), update(1, [5.0, -2.0], n=3)]
    plain = FedAvg().aggregate(1, GLOBAL, updates)
    assert torch.equal(FedAvgM(momentum=0.0).aggregate(1, GLOBAL, updates)["w"], plain["w"])


def test_fedavgm_carries_velocity_across_rounds_and_through_its_state():
    from fedsoda_cli.plugins.aggregators.fedavgm import FedAvgM

    agg = FedAvgM(momentum=0.5)
    first = agg.aggregate(1, GLOBAL, [update(0, 1.0)])  # v = 1 -> theta = 1
    assert first["w"].tolist() == [1.0, 1.0]
    resumed = FedAvgM(momentum=0.5)
    resumed.load_state_dict(agg.state_dict())
    # delta = 0 (the client returns the global adapter), yet momentum keeps moving: v = 0.5
    assert agg.aggregate(2, first, [update(0, 1.0)])["w"].tolist() == [1.5, 1.5]
    assert resumed.aggregate(2, first, [update(0, 1.0)])["w"].tolist() == [1.5, 1.5]
    with pytest.raises(ValueError, match="momentum"):
        FedAvgM(momentum=1.0)


def test_fedavgm_is_a_builtin():
    assert aggregators.create("fedavgm", seed=0).momentum == 0.9
