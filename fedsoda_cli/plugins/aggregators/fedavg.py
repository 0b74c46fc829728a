"""FedAvg (McMahan et al. 2017): the new global adapter is the sample-weighted mean of the clients'.

theta = sum_k n_k * theta_k / sum_k n_k, with n_k = `ClientUpdate.num_samples` (the weight
`federate.weighting` gives the update: by default the examples the client trained on this
round). Sums run in float64 over the updates in the order given (the round loop sorts them by
client), so the result is the same bits wherever and whenever the round runs.
"""

from __future__ import annotations

import torch

from fedsoda_cli.plugins.contracts import AdapterState, Aggregator, ClientUpdate


class FedAvg(Aggregator):
    """Sample-weighted average of the client adapters; stateless."""

    def aggregate(self, round: int, global_adapter: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
        return weighted_mean(global_adapter, updates)


def weighted_mean(global_adapter: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
    """sum_k n_k theta_k / sum_k n_k per tensor, in the global adapter's dtypes. Clients reporting
    0 samples get no weight; if all report 0, every client weighs the same."""
    total = sum(max(u.num_samples, 0) for u in updates)
    weights = [max(u.num_samples, 0) / total if total else 1 / len(updates) for u in updates]
    new = {}
    for name, reference in global_adapter.items():
        acc = sum(w * u.adapter[name].double() for w, u in zip(weights, updates))
        assert isinstance(acc, torch.Tensor)  # not sum()'s start 0: updates is never empty (Aggregator.aggregate)
        new[name] = acc.to(reference.dtype)
    return new
