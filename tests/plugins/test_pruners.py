"""The built-in pruning strategies, the contract validator, and pruner discovery (file, entry point)."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsoda_cli.errors import PluginError, SpecError
from fedsoda_cli.plugins import LayerProfile, Pruner, Registry, load_plugin_files, pruners
from fedsoda_cli.plugins.pruners import (
    BlockInfluencePruner,
    LastLayersPruner,
    SimilarityGroupPruner,
    UniformPruner,
    removable_budget,
)
from fedsoda_cli.spec import load_spec, spec_dir
from fedsoda_cli.spec.schema import PruneSpec
from fedsoda_cli.stages.prune import validate_selection

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_PLUGIN = REPO / "plugins" / "sgp_optimal.py"


def profile_from(distances: dict[int, list[float]], num_layers: int, influence: list[float] | None = None) -> LayerProfile:
    return LayerProfile(num_layers=num_layers, distances=distances, block_influence=influence or [0.5] * num_layers)


def total_distance(profile: LayerProfile, n: int, groups: list[list[int]]) -> float:
    return sum(profile.distances[n][g[0]] for g in groups)


def random_profile(rng: random.Random, num_layers: int, max_span: int) -> LayerProfile:
    distances = {n: [rng.random() for _ in range(num_layers - n + 1)] for n in range(1, max_span + 1)}
    return profile_from(distances, num_layers, [rng.random() for _ in range(num_layers)])


# --- sgp ------------------------------------------------------------------------------------


def test_sgp_picks_lowest_non_overlapping_blocks():
    # d_2(l) for l = 0..6; the lowest (l=3) rules out l=2 and l=4; l=0 is protected.
    d2 = [0.01, 0.5, 0.2, 0.1, 0.15, 0.3, 0.4]
    groups = SimilarityGroupPruner().select(profile_from({2: d2}, 8), PruneSpec(group_size=2, groups=2))
    assert groups == [[3, 4], [5, 6]]  # 0.1 first, then 0.2 (l=2) overlaps, 0.3 (l=5) is next


def test_sgp_min_kept_between_spaces_the_groups():
    # Without spacing the two lowest blocks touch (2..3 and 4..5: one 4-layer gap); with one kept
    # layer required between groups, 4..5 is refused and the next block that keeps a layer, 5..6, wins.
    d2 = [0.9, 0.5, 0.1, 0.8, 0.2, 0.3, 0.4, 0.9]
    profile = profile_from({2: d2}, 9)
    assert SimilarityGroupPruner().select(profile, PruneSpec(group_size=2, groups=2)) == [[2, 3], [4, 5]]
    spaced = SimilarityGroupPruner().select(profile, PruneSpec(group_size=2, groups=2, min_kept_between=1))
    assert spaced == [[2, 3], [5, 6]]
    # Two kept layers between them: 5..6 leaves only layer 4, so 6..7 is taken.
    wider = SimilarityGroupPruner().select(profile, PruneSpec(group_size=2, groups=2, min_kept_between=2))
    assert wider == [[2, 3], [6, 7]]


def test_sgp_min_kept_between_says_when_the_groups_do_not_fit():
    profile = profile_from({2: [0.1] * 8}, 9)
    assert len(SimilarityGroupPruner().select(profile, PruneSpec(group_size=2, groups=3))) == 3
    with pytest.raises(SpecError, match=r"only 2 non-overlapping blocks.*prune.min_kept_between"):
        SimilarityGroupPruner().select(profile, PruneSpec(group_size=2, groups=3, min_kept_between=1))


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_layers=st.integers(6, 32), n=st.integers(1, 3), k=st.integers(1, 3))
def test_sgp_spaced_groups_always_leave_k_kept_layers_between(seed, num_layers, n, k):
    profile = random_profile(random.Random(seed), num_layers, max_span=3)
    config = PruneSpec(group_size=n, groups=2, min_kept_between=k)
    try:
        groups = SimilarityGroupPruner().select(profile, config)
    except SpecError:
        return
    (first, second) = groups
    assert second[0] - first[-1] - 1 >= k
    # Greedy by distance: the lowest admissible block is always one of the groups.
    # (Layers 0 and L-1 are protected, so the starts 1..L-n-1 are admissible.)
    lowest = min(range(1, num_layers - n), key=lambda start: (profile.distances[n][start], start))
    assert lowest in (first[0], second[0])


def test_sgp_respects_protection_switches():
    d1 = [0.0, 0.9, 0.9, 0.9, 0.0]
    profile = profile_from({1: d1}, 5)
    assert SimilarityGroupPruner().select(profile, PruneSpec(group_size=1, groups=1)) == [[1]]
    unprotected = PruneSpec(group_size=1, groups=2, protect_first=False, protect_last=False)
    assert SimilarityGroupPruner().select(profile, unprotected) == [[0], [4]]


def test_sgp_never_chooses_a_non_finite_distance():
    d1 = [0.5, float("inf"), float("nan"), 0.7, 0.5]
    groups = SimilarityGroupPruner().select(profile_from({1: d1}, 5, None), PruneSpec(group_size=1, groups=1))
    assert groups == [[3]]


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_layers=st.integers(3, 32),
    n=st.integers(1, 4),
    p=st.integers(0, 6),
    first=st.booleans(),
    last=st.booleans(),
)
def test_sgp_properties_on_random_profiles(seed, num_layers, n, p, first, last):
    profile = random_profile(random.Random(seed), num_layers, max_span=4)
    config = PruneSpec(group_size=n, groups=p, protect_first=first, protect_last=last)
    protected = {0} if first else set()
    protected |= {num_layers - 1} if last else set()
    try:
        groups = SimilarityGroupPruner().select(profile, config)
    except SpecError as exc:
        assert "prune.groups" in str(exc) and "prune.group_size" in str(exc)
        if n * p <= removable_budget(num_layers, config):
            assert "non-overlapping" in str(exc)  # the budget fits, the greedy packing did not
        return
    assert n * p <= removable_budget(num_layers, config)
    assert len(groups) == p
    flat = [layer for g in groups for layer in g]
    assert len(flat) == len(set(flat)) == n * p, "groups overlap"
    assert not set(flat) & protected
    assert all(g == list(range(g[0], g[0] + n)) for g in groups)
    validate_selection(groups, num_layers, config, "sgp")
    # Greedy maximality: no allowed block below the worst accepted one was left free.
    row = profile.distances[n]
    worst = max((row[g[0]] for g in groups), default=-1)
    for start, d in enumerate(row):
        block = set(range(start, start + n))
        if d < worst and not block & protected:
            assert block & set(flat), f"block {start} (d={d}) was free but skipped"


def test_impossible_requests_raise_spec_error():
    profile = random_profile(random.Random(0), 6, 3)
    with pytest.raises(
        SpecError, match=r"prune.groups = 2 x prune.group_size = 2 removes 4 of the model's 6 layers, but at most 3"
    ):
        SimilarityGroupPruner().select(profile, PruneSpec(group_size=2, groups=2))
    for pruner in (BlockInfluencePruner(), UniformPruner(), LastLayersPruner()):
        with pytest.raises(SpecError, match="prune.group_size"):
            pruner.select(profile, PruneSpec(group_size=4, groups=1))
    # 6 of 7 layers fit the budget, but greedy takes block 2..4 first and leaves only 0..1 and 5..6.
    d3 = [0.9, 0.5, 0.1, 0.5, 0.9]
    with pytest.raises(SpecError, match="only 1 non-overlapping blocks"):
        SimilarityGroupPruner().select(
            profile_from({3: d3}, 7), PruneSpec(group_size=3, groups=2, protect_first=False, protect_last=False)
        )


def test_sgp_needs_the_span_profiled():
    with pytest.raises(SpecError, match="raise profile.max_span to at least 3"):
        SimilarityGroupPruner().select(random_profile(random.Random(1), 12, 2), PruneSpec(group_size=3, groups=1))


def test_zero_groups_remove_nothing():
    profile = random_profile(random.Random(2), 8, 2)
    for pruner in (SimilarityGroupPruner(), BlockInfluencePruner(), UniformPruner(), LastLayersPruner()):
        assert pruner.select(profile, PruneSpec(group_size=2, groups=0)) == []


# --- the other built-ins --------------------------------------------------------------------


def test_block_influence_removes_lowest_single_layers():
    influence = [0.0, 0.3, 0.05, 0.2, 0.01, 0.4, 0.02, 0.0]  # layers 0 and 7 are protected
    profile = profile_from({1: [0.5] * 8}, 8, influence)
    groups = BlockInfluencePruner().select(profile, PruneSpec(group_size=2, groups=2))
    assert groups == [[2], [3], [4], [6]]


def test_uniform_spreads_over_the_middle_layers():
    profile = random_profile(random.Random(3), 30, 1)
    groups = UniformPruner().select(profile, PruneSpec(group_size=3, groups=4))
    assert groups == [[2], [4], [6], [9], [11], [13], [16], [18], [20], [23], [25], [27]]
    strides = {b[0] - a[0] for a, b in zip(groups, groups[1:])}
    assert strides <= {2, 3}
    unprotected = UniformPruner().select(
        profile_from({1: [0.1] * 10}, 10), PruneSpec(group_size=1, groups=2, protect_first=False, protect_last=False)
    )
    assert unprotected == [[2], [7]]


def test_last_removes_the_deepest_layers_but_the_final_one():
    profile = random_profile(random.Random(4), 30, 1)
    assert LastLayersPruner().select(profile, PruneSpec(group_size=3, groups=4)) == [
        [17, 18, 19],
        [20, 21, 22],
        [23, 24, 25],
        [26, 27, 28],
    ]
    assert LastLayersPruner().select(profile, PruneSpec(group_size=2, groups=1, protect_last=False)) == [[28, 29]]


@pytest.mark.parametrize("name", ["sgp", "block-influence", "uniform", "last"])
def test_builtins_are_registered_and_always_valid(name):
    rng = random.Random(5)
    pruner = pruners.create(name)
    for _ in range(50):
        L = rng.randint(4, 40)
        n = rng.randint(1, 3)
        config = PruneSpec(group_size=n, groups=rng.randint(0, max(0, removable_budget(L, PruneSpec()) // n // 2)))
        groups = pruner.select(random_profile(rng, L, 3), config)
        assert validate_selection(groups, L, config, name) == groups


# --- the validator --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, why",
    [
        ([[2, 3], [3, 4]], "overlap at layers \\[3\\]"),
        ([[7, 8], [2, 3]], "outside the layers 0..7"),
        ([[-1, 0], [2, 3]], "outside the layers"),
        ([[0, 1], [3, 4]], "protected layers \\[0\\]"),
        ([[2, 4], [5, 6]], "not a run of consecutive layers"),
        ([[2, 3]], "removes 2 layers, but prune.groups x prune.group_size = 4"),
        ([[2, 3], []], "an empty group"),
        ("2,3", "not a list of lists"),
        (None, "not a list of lists"),
        ([2, 3], "not a list of lists"),
        ([[2.0, 3.0], [4, 5]], "other than integer layer indices"),
        ([[True, 2], [4, 5]], "other than integer layer indices"),
    ],
)
def test_validator_rejects_broken_selections(bad, why):
    with pytest.raises(PluginError, match=f"pruning strategy 'thirdparty' returned an invalid selection: .*{why}"):
        validate_selection(bad, 8, PruneSpec(group_size=2, groups=2), "thirdparty")


def test_validator_refuses_removing_every_layer_and_normalises():
    config = PruneSpec(group_size=1, groups=3, protect_first=False, protect_last=False)
    with pytest.raises(PluginError, match="removes all 3 layers"):
        validate_selection([[0], [1], [2]], 3, config, "greedy")
    assert validate_selection(((5, 4), [1, 2]), 8, PruneSpec(group_size=2, groups=2), "x") == [[1, 2], [4, 5]]


# --- discovery --------------------------------------------------------------------------------


def test_unknown_strategy_suggests_the_closest():
    with pytest.raises(PluginError) as info:
        pruners.get("spg")
    message = str(info.value)
    assert "unknown pruner 'spg'" in message and "did you mean 'sgp'" in message
    assert "registered: " in message and "block-influence" in message and "uniform" in message


def test_a_plugin_file_python_cannot_import_is_named(tmp_path):
    (tmp_path / "plugin.txt").write_text("x = 1\n")
    with pytest.raises(PluginError, match="plugin.txt is not a Python module .*give a .py file"):
        load_plugin_files(["plugin.txt"], tmp_path)


def test_example_plugin_loads_from_the_spec_and_beats_greedy(tmp_path):
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(f'plugins = ["{EXAMPLE_PLUGIN}"]\n[prune]\nstrategy = "sgp-optimal"\ngroup_size = 2\ngroups = 2\n')
    spec = load_spec(spec_file)
    load_plugin_files(spec.plugins, spec_dir(spec))
    pruner = pruners.create(spec.prune.strategy)
    assert isinstance(pruner, Pruner) and pruner.supports_iterative
    # greedy takes 2..3 (0.1), then nothing free below 0.5; the best pair is 1..2 + 3..4 (0.4).
    d2 = [0.5, 0.2, 0.1, 0.2, 0.5, 0.5, 0.6]
    profile = profile_from({2: d2}, 8)
    config = spec.prune.model_copy(update={"protect_first": False})
    assert SimilarityGroupPruner().select(profile, config) == [[0, 1], [2, 3]]
    assert pruner.select(profile, config) == [[1, 2], [3, 4]]


def test_example_plugin_is_optimal_on_random_profiles(tmp_path):
    load_plugin_files([str(EXAMPLE_PLUGIN)], tmp_path)
    optimal, greedy = pruners.create("sgp-optimal"), SimilarityGroupPruner()
    rng = random.Random(6)
    for _ in range(100):
        L, n = rng.randint(5, 16), rng.randint(1, 3)
        config = PruneSpec(group_size=n, groups=rng.randint(1, max(1, (L - 3) // n)))
        profile = random_profile(rng, L, 3)
        try:
            expected = greedy.select(profile, config)
        except SpecError:
            continue
        chosen = validate_selection(optimal.select(profile, config), L, config, "sgp-optimal")
        assert total_distance(profile, n, chosen) <= total_distance(profile, n, expected) + 1e-12


def test_entry_point_pruner_is_found(tmp_path, monkeypatch):
    (tmp_path / "fake_fedsoda_pruner.py").write_text(
        textwrap.dedent("""
        from fedsoda_cli.plugins import Pruner

        class EveryOther(Pruner):
            def select(self, profile, config):
                return [[l] for l in range(1, 2 * config.groups * config.group_size, 2)]
    """)
    )
    dist = tmp_path / "fake_fedsoda_pruner-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-fedsoda-pruner\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedsoda.pruners]\nevery-other = fake_fedsoda_pruner:EveryOther\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("pruner", "fedsoda.pruners", Pruner, {})  # fresh: entry points are read once
    assert "every-other" in registry.names()
    pruner = registry.create("every-other")
    assert pruner.select(profile_from({1: [0.1] * 10}, 10), PruneSpec(group_size=1, groups=3)) == [[1], [3], [5]]
