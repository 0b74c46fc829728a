"""median: coordinate-wise median of the client adapters, robust to up to half bad clients.

For every adapter coordinate, the median of the clients' values (the mean of the two middle
values when the number of updates is even). Sample counts are ignored on purpose: a client could
lie about them. A third-party aggregator in the style of plugins/fedadam.py.

How to enable it
----------------
    plugins = ["plugins/median.py"]

    [federate]
    aggregator = "median"
"""

from __future__ import annotations

import torch

from fedsoda_cli.plugins import Aggregator, aggregators


@aggregators.register("median")
class CoordinateMedian(Aggregator):
    """Coordinate-wise median; stateless, no options."""

    def aggregate(self, round, global_adapter, updates):
        n = len(updates)
        new = {}
        for name, reference in global_adapter.items():
            values = torch.stack([u.adapter[name].double() for u in updates]).sort(dim=0).values
            middle = values[(n - 1) // 2 : n // 2 + 1].mean(dim=0)  # one value if n is odd, two if even
            new[name] = middle.to(reference.dtype)
        return new
