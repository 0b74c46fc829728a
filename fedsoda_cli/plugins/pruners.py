"""The built-in pruning strategies, and the layer budget every strategy must respect.

How n (`prune.group_size`) and p (`prune.groups`) map onto each strategy; every one removes n*p
layers in total and never touches a protected layer (layer 0 with `protect_first`, layer L-1 with
`protect_last`):

  sgp              p groups of n consecutive layers: candidate blocks {l..l+n-1} sorted by d_n(l)
                   ascending, a block accepted when it overlaps no accepted block and touches no
                   protected layer, until p are accepted (similarity group pruning). With
                   prune.min_kept_between = k, a block must also leave at least k kept layers
                   between itself and every accepted block (0: groups may touch, and adjacent
                   groups then remove one longer block).
  block-influence  the n*p single layers of lowest ShortGPT block influence BI_l, as n*p groups
                   of one layer each.
  uniform          FedOT's stride drop: n*p layers spread evenly over the unprotected (middle)
                   layers, as n*p groups of one layer each.
  last             the deepest n*p unprotected layers (with protect_last: all but the final one),
                   as p groups of n consecutive layers.

A request that cannot be met raises SpecError naming prune.groups / prune.group_size.
"""

from __future__ import annotations

import math

from fedsoda_cli.errors import SpecError
from fedsoda_cli.plugins.contracts import LayerProfile, Pruner
from fedsoda_cli.spec.schema import PruneSpec


def protected_layers(num_layers: int, config: PruneSpec) -> set[int]:
    """The layers no strategy may remove: 0 (protect_first) and num_layers-1 (protect_last)."""
    protected = set()
    if config.protect_first:
        protected.add(0)
    if config.protect_last:
        protected.add(num_layers - 1)
    return protected


def blocked_layers(accepted: list[list[int]], protected: set[int], min_kept_between: int) -> set[int]:
    """The layers a new sgp block may not contain: the protected ones, the accepted groups', and
    the `min_kept_between` layers on each side of every accepted group, so that at least that many
    kept layers separate two removed groups."""
    blocked = set(protected)
    for group in accepted:
        blocked.update(range(group[0] - min_kept_between, group[-1] + 1 + min_kept_between))
    return blocked


def admissible_starts(
    distances: list[float], n: int, accepted: list[list[int]], protected: set[int], min_kept_between: int
) -> list[int]:
    """The starts l of the blocks {l..l+n-1} that sgp may still accept, lowest d_n(l) first (ties to
    the lower layer): a finite distance, no blocked layer (`blocked_layers`). The greedy choice takes
    the first; `prune.rerank_top_k` re-ranks the first k."""
    blocked = blocked_layers(accepted, protected, min_kept_between)
    return [
        start
        for start in sorted(range(len(distances)), key=lambda layer: (distances[layer], layer))
        if math.isfinite(distances[start]) and not blocked & set(range(start, start + n))
    ]


def removable_budget(num_layers: int, config: PruneSpec) -> int:
    """Most layers a request may remove: every unprotected layer but one stays removable, so at
    least one unprotected layer is always kept."""
    return max(0, num_layers - len(protected_layers(num_layers, config)) - 1)


def check_request(num_layers: int, config: PruneSpec) -> None:
    """SpecError unless removing prune.groups x prune.group_size layers fits the model."""
    asked = config.groups * config.group_size
    allowed = removable_budget(num_layers, config)
    if asked > allowed:
        protected = sorted(protected_layers(num_layers, config))
        kept = f"layers {protected} are protected and one more must stay" if protected else "at least one layer must stay"
        raise SpecError(
            f"prune.groups = {config.groups} x prune.group_size = {config.group_size} removes {asked} "
            f"of the model's {num_layers} layers, but at most {allowed} can go ({kept}); "
            f"lower prune.groups or prune.group_size"
        )


class SimilarityGroupPruner(Pruner):
    """sgp: the p non-overlapping blocks of n consecutive layers with the lowest angular distance
    d_n(l) between their input and output. A block whose distance is not finite is never chosen
    (iterative pruning marks blocks that would straddle an earlier gap that way)."""

    supports_iterative = True

    def select(self, profile: LayerProfile, config: PruneSpec) -> list[list[int]]:
        n, p, L = config.group_size, config.groups, profile.num_layers
        check_request(L, config)
        if p == 0:
            return []
        if n not in profile.distances:
            measured = max(profile.distances) if profile.distances else 0
            raise SpecError(
                f"prune.group_size = {n} needs d_{n}(l), but the profile measured spans up to {measured}; raise profile.max_span to at least {n} (or lower prune.group_size) and rerun profile"
            )
        distances = profile.distances[n]
        protected = protected_layers(L, config)
        accepted: list[list[int]] = []
        # Accepting the lowest admissible block p times is the greedy pass over the distance order:
        # a block refused once stays refused, as the blocked layers only grow.
        while len(accepted) < p:
            starts = admissible_starts(distances, n, accepted, protected, config.min_kept_between)
            if not starts:
                raise SpecError(too_few_blocks(config, len(accepted), L, sorted(protected)))
            accepted.append(list(range(starts[0], starts[0] + n)))
        return sorted(accepted)


def too_few_blocks(config: PruneSpec, found: int, num_layers: int, protected: list[int]) -> str:
    """The message when sgp cannot place prune.groups blocks."""
    spacing = (
        f", {config.min_kept_between} kept layer(s) between groups (prune.min_kept_between)" if config.min_kept_between else ""
    )
    fix = "lower prune.groups or prune.group_size" + (" or prune.min_kept_between" if config.min_kept_between else "")
    return (
        f"prune.groups = {config.groups} x prune.group_size = {config.group_size}: only {found} non-overlapping "
        f"blocks of {config.group_size} layers were found among the {num_layers} layers (greedy by distance, "
        f"protected layers {protected} excluded{spacing}); {fix}"
    )


class BlockInfluencePruner(Pruner):
    """block-influence (ShortGPT): the n*p layers of lowest BI_l, each its own group."""

    def select(self, profile: LayerProfile, config: PruneSpec) -> list[list[int]]:
        L = profile.num_layers
        check_request(L, config)
        protected = protected_layers(L, config)
        influence = profile.block_influence
        candidates = sorted((layer for layer in range(L) if layer not in protected), key=lambda layer: (influence[layer], layer))
        return [[layer] for layer in sorted(candidates[: config.groups * config.group_size])]


class UniformPruner(Pruner):
    """uniform (FedOT's emulator): n*p layers at an even stride over the unprotected layers, each
    its own group. The i-th of k picks is the middle of the i-th of k equal slices."""

    def select(self, profile: LayerProfile, config: PruneSpec) -> list[list[int]]:
        L = profile.num_layers
        check_request(L, config)
        protected = protected_layers(L, config)
        middle = [layer for layer in range(L) if layer not in protected]
        k = config.groups * config.group_size
        # k <= len(middle) - 1 (check_request), so the slices are at least one layer wide and the
        # picks are distinct.
        return [[middle[math.floor((i + 0.5) * len(middle) / k)]] for i in range(k)]


class LastLayersPruner(Pruner):
    """last: the deepest n*p unprotected layers, as p groups of n consecutive layers."""

    def select(self, profile: LayerProfile, config: PruneSpec) -> list[list[int]]:
        L, n, p = profile.num_layers, config.group_size, config.groups
        check_request(L, config)
        end = L - 1 if config.protect_last else L  # one past the deepest removable layer
        first = end - n * p
        return [list(range(first + g * n, first + (g + 1) * n)) for g in range(p)]


def budget_blocks(profile: LayerProfile, config: PruneSpec, remove_at_least: int, max_span: int | None = None) -> list[list[int]]:
    """The exact minimum-total-distance choice of non-overlapping blocks that removes at least
    `remove_at_least` layers (for `prune.storage_budget`): blocks of any measured span 1..max_span,
    each block {l..l+s-1} costing d_s(l), protected layers never removed, one unprotected layer
    always kept. Dynamic programming over (layers decided, layers removed).

    An optimum never removes `remove_at_least + max_span` layers or more (dropping any one block
    from such a choice still removes enough and costs no more, as d >= 0), so the count is
    searched up to that bound. Ties go to fewer removed layers, then to earlier blocks.
    SpecError when no choice removes enough.
    """
    L = profile.num_layers
    spans = sorted(n for n in profile.distances if n <= (max_span or max(profile.distances, default=0)))
    protected = protected_layers(L, config)
    limit = min(removable_budget(L, config), remove_at_least + max(spans, default=1) - 1)
    if remove_at_least > removable_budget(L, config):
        raise SpecError(
            f"prune.storage_budget needs {remove_at_least} of the model's {L} layers removed, but at most "
            f"{removable_budget(L, config)} can go; raise prune.storage_budget"
        )
    if remove_at_least <= 0:
        return []
    inf = math.inf
    # best[i][k]: (cost, choice) over layers 0..i-1 with k removed; choice = tuple of (start, span).
    best: list[list[tuple[float, tuple]]] = [[(inf, ())] * (limit + 1) for _ in range(L + 1)]
    best[0][0] = (0.0, ())
    for i in range(L):
        for k in range(limit + 1):
            cost, choice = best[i][k]
            if cost == inf:
                continue
            if cost < best[i + 1][k][0]:  # keep layer i
                best[i + 1][k] = (cost, choice)
            for s in spans:
                if i + s > L or k + s > limit or any(layer in protected for layer in range(i, i + s)):
                    continue
                d = profile.distances[s][i] if i < len(profile.distances[s]) else inf
                if not math.isfinite(d):
                    continue
                candidate = (cost + d, choice + ((i, s),))
                if candidate[0] < best[i + s][k + s][0]:
                    best[i + s][k + s] = candidate
    found = [(best[L][k][0], k, best[L][k][1]) for k in range(remove_at_least, limit + 1) if best[L][k][0] < inf]
    if not found:
        raise SpecError(
            f"prune.storage_budget: no blocks of spans {spans} remove {remove_at_least} layers of {L} "
            f"(protected layers {sorted(protected)}); raise prune.storage_budget or profile.max_span"
        )
    _, _, choice = min(found, key=lambda f: (f[0], f[1]))
    return [list(range(start, start + s)) for start, s in choice]
