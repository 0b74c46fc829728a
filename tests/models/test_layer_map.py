"""The layer map: one type, read and written in one place; what prune and align write survives a
round trip byte for byte, keys it does not know included."""

from __future__ import annotations

import json

import pytest

from fedsoda_cli.errors import ArtifactError
from fedsoda_cli.models.layer_map import LAYER_MAP, LayerMap, read_layer_map

BUDGET = {"budget_bytes": 1000, "predicted_client_bytes": 900, "layers_needed": 2}


def test_prune_and_align_maps_are_written_as_before(tmp_path):
    folder = tmp_path / "prune"
    folder.mkdir()
    pruned = LayerMap([0, 1, 4, 5], 6, [[2, 3]], "sgp", False, storage_budget=BUDGET)
    pruned.write(folder / LAYER_MAP)
    expected = {
        "kept": [0, 1, 4, 5],
        "removed_groups": [[2, 3]],
        "num_layers": 6,
        "strategy": "sgp",
        "iterative": False,
        "storage_budget": BUDGET,
    }
    assert (folder / LAYER_MAP).read_text() == json.dumps(expected, indent=2)
    read = read_layer_map(folder / LAYER_MAP)
    assert read == pruned
    aligned = read.with_alignment([1, 4], [])
    assert json.dumps(aligned.to_dict(), indent=2) == json.dumps(
        {**expected, "partial_layers": [1, 4], "bf16_layers": []}, indent=2
    )


def test_unknown_keys_survive_a_round_trip(tmp_path):
    path = tmp_path / "align" / LAYER_MAP
    path.parent.mkdir()
    data = {"kept": [0, 2], "removed_groups": [[1]], "num_layers": 3, "strategy": "x", "iterative": True, "future_key": {"a": 1}}
    path.write_text(json.dumps(data))
    layer_map = read_layer_map(path)
    assert layer_map.extra == {"future_key": {"a": 1}}
    assert layer_map.to_dict() == data
    layer_map.write(path)
    assert json.loads(path.read_text()) == data


def test_removed_groups_default_to_runs_of_removed_layers():
    assert LayerMap([0, 1, 4, 6], 7).removed_groups == [[2, 3], [5]]
    assert LayerMap([0, 1, 2], 3).removed_groups == []


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "no layer map; rerun `fedsoda prune SPEC`"),
        ("{not json", "malformed layer map"),
        ('{"kept": [0, 1]}', "malformed layer map"),
        ('{"kept": [0, 3, 2], "removed_groups": [[1]], "num_layers": 4}', "'kept' must be increasing"),
        ('{"kept": [0, 1], "num_layers": 3}', "no 'removed_groups'"),
        ('{"kept": [0, 1], "removed_groups": [], "num_layers": 3}', "do not cover layers 0..2 exactly once"),
    ],
)
def test_a_damaged_map_names_the_file_and_the_command_that_rebuilds_it(tmp_path, text, message):
    path = tmp_path / "prune" / LAYER_MAP
    path.parent.mkdir()
    if text is not None:
        path.write_text(text)
    with pytest.raises(ArtifactError, match=message) as info:
        read_layer_map(path)
    assert str(path) in str(info.value) and "fedsoda prune SPEC" in str(info.value)


def test_a_stage_without_its_own_command_is_rebuilt_through_run(tmp_path):
    path = tmp_path / "base" / LAYER_MAP  # fedpetuning's first stage
    path.parent.mkdir()
    with pytest.raises(ArtifactError, match="fedsoda run SPEC --from base --force"):
        read_layer_map(path)
