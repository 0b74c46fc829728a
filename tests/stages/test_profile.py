"""profile: streaming angular distances and block influence against a brute-force computation,
and the stage's artifacts."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch
from rich.console import Console

from fedsoda_cli import pipeline
from fedsoda_cli.errors import ArtifactError
from fedsoda_cli.models.load import load_causal_lm
from fedsoda_cli.sgp.angular import AngularDistanceAccumulator, measure
from fedsoda_cli.spec import load_spec
from fedsoda_cli.spec.schema import ModelSpec
from fedsoda_cli.stages.profile import most_redundant, read_profile

LENGTHS = [16, 9, 12, 5]  # a right-padded batch of different lengths


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    return model, tokenizer


@pytest.fixture(scope="module")
def padded_batch(tiny):
    """Right-padded ids and mask; the pad positions hold random ids that must not matter."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (len(LENGTHS), max(LENGTHS)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        mask[row, :length] = 1
    return ids, mask


def boundaries(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """h_0..h_L of one unpadded sequence [T] as float64 [T, hidden]: hidden_states[0..L-1] are the
    layer inputs; hidden_states[L] has the final norm, so h_L comes from a hook on the last layer."""
    captured = {}
    handle = model.model.layers[-1].register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
    with torch.no_grad():
        states = model(ids[None], output_hidden_states=True).hidden_states
    handle.remove()
    L = model.config.num_hidden_layers
    return [h[0].double() for h in states[:L]] + [captured["h"][0].double()]


def brute_force(model, ids, mask, max_span, tokens):
    """d_n(l) and BI_l computed directly from every sequence run alone, all boundaries kept."""
    L = model.config.num_hidden_layers
    angles = {(n, layer): [] for n in range(1, max_span + 1) for layer in range(L - n + 1)}
    cosines = {layer: [] for layer in range(L)}
    for row in range(ids.shape[0]):
        length = int(mask[row].sum())
        h = boundaries(model, ids[row, :length])
        for (n, layer), bucket in angles.items():
            cos = torch.nn.functional.cosine_similarity(h[layer], h[layer + n], dim=-1).clamp(-1, 1)
            chosen = cos[-1:] if tokens == "last" else cos
            bucket.extend((torch.arccos(chosen) / math.pi).tolist())
        for layer in range(L):
            cosines[layer].extend(torch.nn.functional.cosine_similarity(h[layer], h[layer + 1], dim=-1).tolist())
    distances = {n: [sum(angles[n, layer]) / len(angles[n, layer]) for layer in range(L - n + 1)] for n in range(1, max_span + 1)}
    influence = [1 - sum(c) / len(c) for c in cosines.values()]
    return distances, influence


@pytest.mark.parametrize("tokens", ["last", "all"])
def test_padded_batch_matches_brute_force(tiny, padded_batch, tokens):
    model, _ = tiny
    ids, mask = padded_batch
    profile = measure(model, ids, mask, max_span=3, tokens=tokens, batch_size=len(LENGTHS))
    distances, influence = brute_force(model, ids, mask, 3, tokens)
    assert sorted(profile.distances) == [1, 2, 3]
    for n in (1, 2, 3):
        assert len(profile.distances[n]) == 6 - n + 1
        assert profile.distances[n] == pytest.approx(distances[n], abs=2e-6)
    assert profile.block_influence == pytest.approx(influence, abs=2e-6)


def test_pad_tokens_are_ignored(tiny, padded_batch):
    model, tokenizer = tiny
    ids, mask = padded_batch
    other = torch.where(mask.bool(), ids, torch.full_like(ids, tokenizer.pad_token_id))
    for tokens in ("last", "all"):
        a = measure(model, ids, mask, 2, tokens, batch_size=4)
        b = measure(model, other, mask, 2, tokens, batch_size=4)
        for n in (1, 2):
            assert a.distances[n] == pytest.approx(b.distances[n], abs=1e-6)
        assert a.block_influence == pytest.approx(b.block_influence, abs=1e-6)


@pytest.mark.parametrize("tokens", ["last", "all"])
def test_streaming_batches_equal_one_batch(tiny, padded_batch, tokens):
    model, _ = tiny
    ids, mask = padded_batch
    whole = measure(model, ids, mask, 4, tokens, batch_size=len(LENGTHS))
    one_by_one = measure(model, ids, mask, 4, tokens, batch_size=1)
    for n in whole.distances:
        assert one_by_one.distances[n] == pytest.approx(whole.distances[n], abs=1e-6)
    assert one_by_one.block_influence == pytest.approx(whole.block_influence, abs=1e-6)


def test_max_span_is_capped_at_depth_and_progress_counts_sequences(tiny, padded_batch):
    model, _ = tiny
    ids, mask = padded_batch
    seen = []
    profile = measure(model, ids, mask, max_span=50, tokens="last", batch_size=3, progress=seen.append)
    assert sorted(profile.distances) == [1, 2, 3, 4, 5, 6]
    assert len(profile.distances[6]) == 1
    assert seen == [3, 1]
    assert all(0 <= d <= 1 for row in profile.distances.values() for d in row)


def test_accumulator_memory_does_not_grow_with_batches():
    """Only max_span boundaries are held, whatever the depth and however many batches came in."""
    acc = AngularDistanceAccumulator(num_layers=10, max_span=2, tokens="all")
    for _ in range(3):
        acc.begin_batch(torch.ones(2, 4, dtype=torch.long))
        for layer in range(11):
            acc.add_boundary(layer, torch.randn(2, 4, 8))
            assert len(acc._recent) <= 2
    assert acc.angle_counts[0, 0] == 3 * 8


def test_out_of_order_boundaries_are_refused():
    acc = AngularDistanceAccumulator(num_layers=4, max_span=2, tokens="last")
    acc.begin_batch(torch.ones(1, 3, dtype=torch.long))
    acc.add_boundary(0, torch.randn(1, 3, 8))
    with pytest.raises(RuntimeError, match="out of order"):
        acc.add_boundary(2, torch.randn(1, 3, 8))


def test_identical_boundaries_have_zero_distance():
    acc = AngularDistanceAccumulator(num_layers=3, max_span=3, tokens="last")
    h = torch.randn(2, 5, 8)
    acc.begin_batch(torch.ones(2, 5, dtype=torch.long))
    for layer in range(4):
        acc.add_boundary(layer, h * (layer + 1))  # same direction, different length
    profile = acc.result()
    assert all(d == pytest.approx(0, abs=1e-6) for row in profile.distances.values() for d in row)
    assert profile.block_influence == pytest.approx([0, 0, 0], abs=1e-12)


def write_spec(tmp_path, extra: str = "") -> object:
    path = tmp_path / "spec.toml"
    path.write_text(f"""
[run]
workdir = "run"
threads = 1
[model]
name = "tiny-random-llama"
[public_data]
sequences = 4
seq_len = 32
[profile]
max_span = 3
batch_size = 3
[prune]
group_size = 2
groups = 1
{extra}
""")
    return load_spec(path)


def test_stage_writes_consistent_artifacts(tmp_path):
    spec = write_spec(tmp_path)
    workdir = tmp_path / "run"
    manifest = pipeline.execute(spec, workdir, pipeline.stage_named(spec, "profile"), Console(file=io.StringIO()))
    folder = workdir / "profile"
    data = json.loads((folder / "distances.json").read_text())
    assert data["num_layers"] == 6 and data["max_span"] == 3 and data["tokens"] == "last"
    assert data["sequences"] == 4 and data["seq_len"] == 32
    assert [len(data["distances"][str(n)]) for n in (1, 2, 3)] == [6, 5, 4]
    with open(folder / "distances.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 + 5 + 4
    for row in rows:
        assert float(row["distance"]) == data["distances"][row["n"]][int(row["l"])]
    with open(folder / "block_influence.csv") as handle:
        influence = [float(r["block_influence"]) for r in csv.DictReader(handle)]
    assert influence == data["block_influence"]
    assert (folder / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert manifest.metrics["num_layers"] == 6 and manifest.metrics["tokens_per_s"] > 0

    profile = read_profile(folder)
    assert profile.distances[2] == data["distances"]["2"]
    best = most_redundant(profile, 2)
    assert len(best) == 5 and [d for _, d in best] == sorted(profile.distances[2])


def test_read_profile_names_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ArtifactError, match="distances.json: missing"):
        read_profile(tmp_path)
    (tmp_path / "distances.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="distances.json: not readable JSON"):
        read_profile(tmp_path)
    (tmp_path / "distances.json").write_text(
        json.dumps({"num_layers": 4, "distances": {"1": [0.1, 0.2]}, "block_influence": [0.1] * 4})
    )
    with pytest.raises(ArtifactError, match="malformed profile"):
        read_profile(tmp_path)
