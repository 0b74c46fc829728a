"""trimmed_mean: coordinate-wise trimmed mean, robust to a few bad clients (Yin et al. 2018).

For every adapter coordinate, sort the clients' values, drop the k largest and the k smallest
(k = floor(trim * number of updates), at most (n - 1) // 2 so at least one value stays) and
average the rest. Sample counts are ignored on purpose: a client could lie about them.

A third-party aggregator in the style of plugins/fedadam.py (see there for the contract).

How to enable it
----------------
    plugins = ["plugins/trimmed_mean.py"]

    [federate]
    aggregator = "trimmed_mean"
    aggregator_options = { trim = 0.2 }   # share trimmed at EACH end, 0 <= trim < 0.5
"""

from __future__ import annotations

import torch

from fedsoda_cli.plugins import Aggregator, aggregators


@aggregators.register("trimmed_mean")
class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean; option trim (share cut at each end, default 0.2)."""

    def __init__(self, seed: int = 0, trim: float = 0.2):
        super().__init__(seed)
        if not 0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        self.trim = trim

    def aggregate(self, round, global_adapter, updates):
        n = len(updates)
        k = min(int(self.trim * n), (n - 1) // 2)
        new = {}
        for name, reference in global_adapter.items():
            values = torch.stack([u.adapter[name].double() for u in updates]).sort(dim=0).values
            new[name] = values[k : n - k].mean(dim=0).to(reference.dtype)
        return new
