"""prune, end to end on the tiny model through the pipeline: layer map, reloadable sub-LLM whose
logits equal the full model with the removed layers skipped, KV-cache generation, iterative mode,
third-party strategies; and one integration run on the real SmolLM2."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fedsoda_cli import pipeline
from fedsoda_cli.errors import ArtifactError, PluginError, SpecError
from fedsoda_cli.models.layers import decoder_layers
from fedsoda_cli.models.load import load_causal_lm, load_checkpoint
from fedsoda_cli.sgp.angular import measure
from fedsoda_cli.spec import load_spec
from fedsoda_cli.spec.schema import ModelSpec
from fedsoda_cli.stages.profile import public_input_ids, read_profile

REPO = Path(__file__).resolve().parents[2]
QUIET = Console(file=io.StringIO())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


def make_spec(
    folder: Path, model: str = "tiny-random-llama", prune: str = "", extra: str = "", sequences: int = 4, seq_len: int = 32
):
    path = folder / "spec.toml"
    path.write_text(f"""
{extra}
[run]
workdir = "run"
threads = 1
[model]
name = "{model}"
[public_data]
sequences = {sequences}
seq_len = {seq_len}
[profile]
max_span = 3
batch_size = 2
[prune]
{prune}
""")
    return load_spec(path)


def run_stages(spec, workdir: Path, *names: str):
    return [pipeline.execute(spec, workdir, pipeline.stage_named(spec, name), QUIET) for name in names]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """profile + prune (sgp, n=2, p=1) of the 6-layer tiny llama; returns (spec, workdir)."""
    folder = tmp_path_factory.mktemp("prune")
    spec = make_spec(folder, prune="group_size = 2\ngroups = 1")
    run_stages(spec, folder / "run", "profile", "prune")
    return spec, folder / "run"


def skip_layers(model, removed: set[int]):
    """Hooks that make the removed layers of the full model pass their input through unchanged."""
    return [
        layer.register_forward_hook(lambda m, args, out: args[0]) for i, layer in enumerate(decoder_layers(model)) if i in removed
    ]


def test_layer_map_follows_the_profile(pruned):
    spec, workdir = pruned
    layer_map = json.loads((workdir / "prune" / "layer_map.json").read_text())
    profile = read_profile(workdir / "profile")
    d2 = profile.distances[2]
    best = min(range(1, len(d2) - 1), key=lambda layer: d2[layer])  # blocks 0..1 and 4..5 touch protected layers
    assert layer_map["removed_groups"] == [[best, best + 1]]
    assert layer_map["kept"] == [layer for layer in range(6) if layer not in (best, best + 1)]
    assert layer_map["num_layers"] == 6 and layer_map["strategy"] == "sgp" and layer_map["iterative"] is False
    manifest = json.loads((workdir / "prune" / "manifest.json").read_text())
    assert manifest["metrics"]["kept"] == 4
    assert manifest["metrics"]["params_sub"] < manifest["metrics"]["params_full"]


def test_sub_llm_equals_full_model_with_layers_skipped(pruned):
    spec, workdir = pruned
    layer_map = json.loads((workdir / "prune" / "layer_map.json").read_text())
    removed = {layer for g in layer_map["removed_groups"] for layer in g}
    sub, tokenizer = load_checkpoint(workdir / "prune" / "model")
    assert sub.config.num_hidden_layers == 6 - 2 == len(decoder_layers(sub))
    assert next(sub.parameters()).dtype == torch.float32
    full, _ = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    ids = public_input_ids(spec, tokenizer)[:2, :24]
    handles = skip_layers(full, removed)
    with torch.no_grad():
        expected = full(ids).logits
        got = sub(ids).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sub_llm_generates_with_kv_cache(pruned):
    spec, workdir = pruned
    sub, tokenizer = load_checkpoint(workdir / "prune" / "model")
    ids = public_input_ids(spec, tokenizer)[:1, :12]
    with torch.no_grad():
        cached = sub.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = sub.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape[1] == 12 + 8
    assert torch.equal(cached, uncached)
    assert [layer.self_attn.layer_idx for layer in decoder_layers(sub)] == [0, 1, 2, 3]


def test_iterative_reprofiles_the_pruned_model(tmp_path):
    spec = make_spec(tmp_path, prune="group_size = 1\ngroups = 3\niterative = true")
    workdir = tmp_path / "run"
    run_stages(spec, workdir, "profile", "prune")
    layer_map = json.loads((workdir / "prune" / "layer_map.json").read_text())
    assert len(layer_map["kept"]) == 3 and layer_map["iterative"] is True
    # Replay the choices: each is the lowest d_1 of the model pruned so far (original indices).
    model, tokenizer = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    ids = public_input_ids(spec, tokenizer)
    full = read_profile(workdir / "profile")
    first = min(range(1, 5), key=lambda layer: full.distances[1][layer])
    from fedsoda_cli.models.layers import drop_layers

    kept = drop_layers(model, [first])
    again = measure(model, ids, None, 1, "last", 2)
    second = kept[min(range(1, 4), key=lambda layer: again.distances[1][layer])]
    removed = {g[0] for g in layer_map["removed_groups"]}
    assert first in removed and second in removed
    assert layer_map["removed_groups"] == [[layer] for layer in sorted(removed)]
    sub, _ = load_checkpoint(workdir / "prune" / "model")
    assert sub.config.num_hidden_layers == 3


@pytest.mark.parametrize("rerank", [0, 3])
def test_min_kept_between_spaces_the_removed_groups(tmp_path, rerank):
    # 6 layers, 0 and 5 protected, two single-layer groups: with one kept layer required between
    # them only {1, 3}, {1, 4} or {2, 4} remain; the choice is the lowest admissible by distance
    # (or, re-ranked, no trial ever proposes a block next to an accepted group).
    spec = make_spec(tmp_path, prune=f"group_size = 1\ngroups = 2\nmin_kept_between = 1\nrerank_top_k = {rerank}")
    workdir = tmp_path / "run"
    run_stages(spec, workdir, "profile", "prune")
    groups = json.loads((workdir / "prune" / "layer_map.json").read_text())["removed_groups"]
    (first,), (second,) = groups
    assert second - first >= 2
    manifest = json.loads((workdir / "prune" / "manifest.json").read_text())
    if rerank:
        trials = manifest["metrics"]["rerank"]["trials"]
        accepted = min((t for t in trials if t["group"] == 1), key=lambda t: t["ppl"])["block"][0]
        assert all(abs(t["block"][0] - accepted) >= 2 for t in trials if t["group"] == 2)
    else:
        d1 = read_profile(workdir / "profile").distances[1]
        pairs = [(a, b) for a in range(1, 5) for b in range(a + 2, 5)]
        best = min(range(1, 5), key=lambda layer: (d1[layer], layer))
        assert best in (first, second) and (first, second) in pairs


def test_min_kept_between_needs_plain_sgp(tmp_path):
    for extra in ("iterative = true", 'strategy = "uniform"'):
        with pytest.raises(SpecError, match="prune.min_kept_between spaces sgp"):
            make_spec(tmp_path, prune=f"group_size = 1\ngroups = 2\nmin_kept_between = 1\n{extra}")


def test_third_party_strategy_from_the_spec(tmp_path):
    plugin = REPO / "plugins" / "sgp_optimal.py"
    spec = make_spec(tmp_path, prune='strategy = "sgp-optimal"\ngroup_size = 1\ngroups = 2', extra=f'plugins = ["{plugin}"]')
    workdir = tmp_path / "run"
    run_stages(spec, workdir, "profile", "prune")
    layer_map = json.loads((workdir / "prune" / "layer_map.json").read_text())
    assert layer_map["strategy"] == "sgp-optimal" and len(layer_map["kept"]) == 4
    d1 = read_profile(workdir / "profile").distances[1]
    assert layer_map["removed_groups"] == [[layer] for layer in sorted(sorted(range(1, 5), key=lambda layer: d1[layer])[:2])]


def test_broken_third_party_output_stops_before_any_file(tmp_path):
    plugin = tmp_path / "overlapping.py"
    plugin.write_text(
        "from fedsoda_cli.plugins import Pruner, pruners\n\n"
        "@pruners.register('test-overlapping')\n"
        "class Overlapping(Pruner):\n"
        "    def select(self, profile, config):\n"
        "        return [[1, 2], [2, 3]]\n"
    )
    spec = make_spec(
        tmp_path, prune='strategy = "test-overlapping"\ngroup_size = 2\ngroups = 1', extra='plugins = ["overlapping.py"]'
    )
    workdir = tmp_path / "run"
    run_stages(spec, workdir, "profile")
    with pytest.raises(PluginError, match="'test-overlapping' returned an invalid selection: groups overlap at layers \\[2\\]"):
        run_stages(spec, workdir, "prune")
    assert not (workdir / "prune").exists()


def test_bad_requests_are_spec_errors(tmp_path):
    workdir = tmp_path / "run"
    spec = make_spec(tmp_path, prune="group_size = 2\ngroups = 2")
    run_stages(spec, workdir, "profile")
    with pytest.raises(SpecError, match="removes 4 of the model's 6 layers, but at most 3"):
        run_stages(spec, workdir, "prune")
    spec = make_spec(tmp_path, prune='strategy = "uniform"\ngroup_size = 1\ngroups = 1\niterative = true')
    with pytest.raises(SpecError, match="does not support iterative"):
        run_stages(spec, workdir, "prune")
    spec = make_spec(tmp_path, prune='strategy = "unifrom"')
    with pytest.raises(PluginError, match="did you mean 'uniform'"):
        run_stages(spec, workdir, "prune")


def test_corrupt_profile_is_an_artifact_error(tmp_path):
    from fedsoda_cli.pipeline import StageContext
    from fedsoda_cli.stages import prune

    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "distances.json").write_text("[1, 2")
    spec = make_spec(tmp_path)
    ctx = StageContext(spec=spec, workdir=tmp_path, out=tmp_path / "out", inputs={"profile": tmp_path / "profile"}, console=QUIET)
    with pytest.raises(ArtifactError, match="distances.json: not readable JSON"):
        prune.run(ctx)


@pytest.mark.integration
def test_smollm2_profile_prune_generate(tmp_path):
    spec = make_spec(tmp_path, model="smollm2-135m", prune="group_size = 2\ngroups = 2", sequences=4, seq_len=64)
    workdir = tmp_path / "run"
    run_stages(spec, workdir, "profile", "prune")
    layer_map = json.loads((workdir / "prune" / "layer_map.json").read_text())
    assert layer_map["num_layers"] == 30 and len(layer_map["kept"]) == 26
    sub, tokenizer = load_checkpoint(workdir / "prune" / "model")
    assert sub.config.num_hidden_layers == 26
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = sub.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()
