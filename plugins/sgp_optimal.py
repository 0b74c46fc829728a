"""sgp-optimal: similarity group pruning with the best set of blocks instead of a greedy one.

A worked example of a third-party pruning strategy. The built-in `sgp` accepts blocks greedily,
lowest d_n(l) first; one very low block can then sit between two almost as low blocks and rule
both out. This strategy instead picks the p non-overlapping blocks {l..l+n-1} whose angular
distances have the lowest SUM, by dynamic programming over the layers (O(L * p)).

How a third party writes one
----------------------------
    from fedsoda_cli.plugins import Pruner, pruners

    @pruners.register("my-strategy")
    class MyPruner(Pruner):
        def select(self, profile, config):       # LayerProfile, PruneSpec
            ...                                  # -> [[l, l+1, ...], ...] original layer indices

`profile.distances[n][l]` is d_n(l), `profile.block_influence[l]` is BI_l, `profile.num_layers` is
L; `config.group_size` is n, `config.groups` is p, `config.protect_first` / `config.protect_last`
guard layers 0 and L-1. fedsoda checks what `select` returns (consecutive groups, in range, no
overlap, protected layers untouched, n*p layers in all) and names the strategy if it is wrong.

How to enable it
----------------
In the experiment spec (paths relative to the spec file):

    plugins = ["plugins/sgp_optimal.py"]

    [prune]
    strategy = "sgp-optimal"

or publish it in a package under the entry-point group `fedsoda.pruners`:

    [project.entry-points."fedsoda.pruners"]
    sgp-optimal = "my_package.sgp_optimal:OptimalGroupPruner"
"""

from __future__ import annotations

import math

from fedsoda_cli.errors import SpecError
from fedsoda_cli.plugins import Pruner, pruners
from fedsoda_cli.plugins.pruners import check_request, protected_layers


@pruners.register("sgp-optimal")
class OptimalGroupPruner(Pruner):
    """The p non-overlapping, unprotected blocks of n layers with the lowest total d_n(l)."""

    # Iterative pruning marks blocks that straddle an earlier gap with an infinite distance,
    # which this strategy never chooses, so it may be re-run after each accepted block.
    supports_iterative = True

    def select(self, profile, config):
        n, p, L = config.group_size, config.groups, profile.num_layers
        check_request(L, config)
        if p == 0:
            return []
        if n not in profile.distances:
            raise SpecError(f"prune.group_size = {n} was not profiled; raise profile.max_span to at least {n}")
        cost = self._block_costs(profile.distances[n], n, protected_layers(L, config))
        best, took = self._solve(cost, L, n, p)
        if math.isinf(best[L][p]):
            raise SpecError(
                f"prune.groups = {p} x prune.group_size = {n}: no {p} non-overlapping unprotected blocks fit in {L} layers"
            )
        return self._trace(took, L, n, p)

    @staticmethod
    def _block_costs(distances, n, protected):
        """cost[l] = d_n(l), or inf when block l..l+n-1 touches a protected layer or is unmeasurable."""
        return [
            d if math.isfinite(d) and not set(range(layer, layer + n)) & protected else math.inf
            for layer, d in enumerate(distances)
        ]

    @staticmethod
    def _solve(cost, L, n, p):
        """best[i][k]: lowest total of k blocks inside layers 0..i-1; took[i][k]: whether that
        optimum ends with the block i-n..i-1."""
        best = [[0.0] + [math.inf] * p for _ in range(L + 1)]
        took = [[False] * (p + 1) for _ in range(L + 1)]
        for i in range(1, L + 1):
            for k in range(1, p + 1):
                best[i][k] = best[i - 1][k]
                if i >= n and best[i - n][k - 1] + cost[i - n] < best[i][k]:
                    best[i][k] = best[i - n][k - 1] + cost[i - n]
                    took[i][k] = True
        return best, took

    @staticmethod
    def _trace(took, L, n, p):
        groups, i, k = [], L, p
        while k > 0:
            if took[i][k]:
                groups.append(list(range(i - n, i)))
                i, k = i - n, k - 1
            else:
                i -= 1
        return sorted(groups)
