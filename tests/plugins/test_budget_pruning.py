"""prune.storage_budget's block choice: the exact minimum-total-distance set of non-overlapping
blocks (any measured span) that removes at least the layers the budget needs, checked against
brute force on random profiles."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from fedsoda_cli.errors import SpecError
from fedsoda_cli.plugins import LayerProfile
from fedsoda_cli.plugins.pruners import SimilarityGroupPruner, budget_blocks, protected_layers, removable_budget
from fedsoda_cli.spec.schema import PruneSpec


def random_profile(rng: random.Random, num_layers: int, max_span: int) -> LayerProfile:
    distances = {n: [rng.random() for _ in range(num_layers - n + 1)] for n in range(1, max_span + 1)}
    return LayerProfile(num_layers=num_layers, distances=distances, block_influence=[0.5] * num_layers)


def brute_force(profile: LayerProfile, config: PruneSpec, need: int) -> float:
    """The lowest total distance over every set of disjoint blocks removing >= need layers."""
    L, protected = profile.num_layers, protected_layers(profile.num_layers, config)
    blocks = [
        (layer, n)
        for n, row in profile.distances.items()
        for layer in range(len(row))
        if layer + n <= L and not protected & set(range(layer, layer + n))
    ]
    best = math.inf
    for k in range(1, L + 1):
        for combo in itertools.combinations(blocks, k):
            layers = [layer for start, n in combo for layer in range(start, start + n)]
            if len(layers) != len(set(layers)) or not need <= len(layers) <= removable_budget(L, config):
                continue
            best = min(best, sum(profile.distances[n][start] for start, n in combo))
    return best


def cost(profile: LayerProfile, groups: list[list[int]]) -> float:
    return sum(profile.distances[len(g)][g[0]] for g in groups)


@pytest.mark.parametrize("seed", range(12))
def test_budget_choice_is_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    L, span = rng.randint(5, 8), rng.randint(1, 3)
    config = PruneSpec(protect_first=rng.random() < 0.7, protect_last=rng.random() < 0.7)
    profile = random_profile(rng, L, span)
    need = rng.randint(1, removable_budget(L, config))
    groups = budget_blocks(profile, config, need)
    removed = [layer for g in groups for layer in g]
    assert len(removed) == len(set(removed)) >= need
    assert not set(removed) & protected_layers(L, config)
    assert all(g == list(range(g[0], g[0] + len(g))) and len(g) <= span for g in groups)
    assert cost(profile, groups) == pytest.approx(brute_force(profile, config, need), abs=1e-12)


def test_budget_choice_never_costs_more_than_sgp_at_the_same_layer_count():
    rng = random.Random(7)
    for _ in range(20):
        profile = random_profile(rng, 12, 3)
        config = PruneSpec(group_size=3, groups=2)
        sgp = SimilarityGroupPruner().select(profile, config)
        assert cost(profile, budget_blocks(profile, config, 6)) <= cost(profile, sgp) + 1e-12


def test_a_longer_cheaper_block_beats_a_shorter_one():
    # Removing 3 layers fits the budget as well as removing 2, and costs less: the optimum may remove more.
    distances = {1: [9.0] * 8, 2: [9.0] * 7, 3: [9.0, 9.0, 0.1, 9.0, 9.0, 9.0]}
    profile = LayerProfile(num_layers=8, distances=distances, block_influence=[0.5] * 8)
    assert budget_blocks(profile, PruneSpec(), 2) == [[2, 3, 4]]


def test_infinite_distances_are_never_chosen_and_impossible_budgets_are_spec_errors():
    distances = {1: [math.inf, 0.5, math.inf, 0.2, math.inf, math.inf]}
    profile = LayerProfile(num_layers=6, distances=distances, block_influence=[0.5] * 6)
    assert budget_blocks(profile, PruneSpec(), 2) == [[1], [3]]
    with pytest.raises(SpecError, match="prune.storage_budget"):
        budget_blocks(profile, PruneSpec(), 3)
    with pytest.raises(SpecError, match="at most 3 can go"):
        budget_blocks(profile, PruneSpec(), 4)
    assert budget_blocks(profile, PruneSpec(), 0) == []
