"""Stage 1, profile: angular distances between the layer inputs of the full LLM on public text.

In: the spec's model and `public_data.sequences` windows of `public_data.seq_len` tokens from
`public_data.split`. Out (in the stage folder):
  distances.json       {num_layers, max_span, tokens, sequences, seq_len,
                        distances: {"n": [d_n(0), ..., d_n(L-n)]}, block_influence: [BI_0..BI_{L-1}]}
  distances.csv        n,l,distance
  block_influence.csv  layer,block_influence
  heatmap.png          d_n(l) over start layer l (x) and span n (y)
The math lives in `angular.py` (`measure`, re-exported here, is what iterative pruning reuses);
this module loads, runs, writes and reads the files.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

from fedsoda_cli.errors import ArtifactError
from fedsoda_cli.plugins.contracts import LayerProfile
from fedsoda_cli.sgp.angular import measure
from fedsoda_cli.stages.contract import StageContext, StageResult

__all__ = ["measure", "most_redundant", "public_input_ids", "read_profile", "run", "write_heatmap", "write_profile"]

DISTANCES_JSON = "distances.json"
DISTANCES_CSV = "distances.csv"
BLOCK_INFLUENCE_CSV = "block_influence.csv"
HEATMAP_PNG = "heatmap.png"
TOP_BLOCKS = 5


def run(ctx: StageContext) -> StageResult:
    """Profile the full model on the public sequences and write the distance artifacts."""
    from fedsoda_cli import terminal
    from fedsoda_cli.models.load import load_causal_lm

    spec = ctx.spec
    model, tokenizer = load_causal_lm(spec.model)
    input_ids = public_input_ids(spec, tokenizer)
    count, seq_len = input_ids.shape
    with terminal.progress(ctx.console) as bar:
        task = bar.add_task("profile", total=count, status=f"{seq_len} tokens each")
        started = time.perf_counter()
        profile = measure(
            model,
            input_ids,
            None,
            spec.profile.max_span,
            spec.profile.tokens,
            spec.profile.batch_size,
            progress=lambda k: bar.advance(task, k),
        )
        elapsed = time.perf_counter() - started

    meta = {"tokens": spec.profile.tokens, "sequences": count, "seq_len": seq_len}
    write_profile(ctx.out, profile, meta)
    write_heatmap(ctx.out / HEATMAP_PNG, profile, spec.profile.tokens)

    metrics = {
        "num_layers": profile.num_layers,
        "max_span": max(profile.distances),
        "tokens_per_s": round(count * seq_len / elapsed, 1),
        "sequences_per_s": round(count / elapsed, 2),
    }
    return StageResult(metrics=metrics, summary=_summary(profile, spec.prune.group_size, metrics, count, seq_len))


def public_input_ids(spec, tokenizer):
    """LongTensor [public_data.sequences, public_data.seq_len] of the profiling text (full windows,
    no padding). Prune reuses it to re-profile a pruned model on the same text."""
    from fedsoda_cli.data.public import public_windows

    return public_windows(spec, "train", tokenizer)


def most_redundant(profile: LayerProfile, span: int, top: int = TOP_BLOCKS) -> list[tuple[int, float]]:
    """The `top` starts l with the lowest d_span(l), as (l, distance), lowest first ([] if unmeasured)."""
    row = profile.distances.get(span, [])
    ranked = sorted(range(len(row)), key=lambda layer: (row[layer], layer))
    return [(layer, row[layer]) for layer in ranked[:top]]


def write_profile(folder: Path, profile: LayerProfile, meta: dict) -> None:
    """distances.json, distances.csv and block_influence.csv for `profile` into `folder`.
    `meta` carries tokens, sequences and seq_len."""
    payload = {
        "num_layers": profile.num_layers,
        "max_span": max(profile.distances),
        **meta,
        "distances": {str(n): row for n, row in sorted(profile.distances.items())},
        "block_influence": profile.block_influence,
    }
    (folder / DISTANCES_JSON).write_text(json.dumps(payload, indent=2))
    with open(folder / DISTANCES_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["n", "l", "distance"])
        for n, row in sorted(profile.distances.items()):
            writer.writerows((n, layer, repr(d)) for layer, d in enumerate(row))
    with open(folder / BLOCK_INFLUENCE_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", "block_influence"])
        writer.writerows((layer, repr(bi)) for layer, bi in enumerate(profile.block_influence))


def read_profile(folder: Path) -> LayerProfile:
    """The LayerProfile stored in `folder/distances.json`; ArtifactError naming the file if it is
    missing, not JSON, or not shaped as `write_profile` writes it."""
    path = Path(folder) / DISTANCES_JSON
    fix = "rerun `fedsoda profile SPEC --force`"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not readable JSON ({exc}); {fix}") from None
    try:
        num_layers = int(data["num_layers"])
        distances = {int(n): [float(d) for d in row] for n, row in data["distances"].items()}
        influence = [float(b) for b in data["block_influence"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{path}: malformed profile ({type(exc).__name__}: {exc}); {fix}") from None
    bad = [n for n, row in distances.items() if not 1 <= n <= num_layers or len(row) != num_layers - n + 1]
    if num_layers < 1 or len(influence) != num_layers or bad or not distances:
        raise ArtifactError(f"{path}: malformed profile (row lengths do not match num_layers = {num_layers}); {fix}")
    return LayerProfile(num_layers=num_layers, distances=distances, block_influence=influence)


def write_heatmap(path: Path, profile: LayerProfile, tokens: str) -> None:
    """A PNG heatmap of d_n(l): x = start layer l, y = span n; cells with l > L-n are blank and
    the lowest cell of each span (SGP's first pick) is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    L, spans = profile.num_layers, sorted(profile.distances)
    grid = np.full((len(spans), L), np.nan)
    for row, n in enumerate(spans):
        grid[row, : len(profile.distances[n])] = profile.distances[n]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * L + 2), max(3.0, 0.45 * len(spans) + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap="viridis")
    for row in range(len(spans)):
        best = int(np.nanargmin(grid[row]))
        ax.plot(best, row, marker="x", color="white", markersize=7, markeredgewidth=2)
    step = 1 if L <= 32 else math.ceil(L / 32)
    ax.set_xticks(range(0, L, step))
    ax.set_yticks(range(len(spans)), [str(n) for n in spans])
    ax.tick_params(labelsize=8)
    ax.set_xlabel("start layer l")
    ax.set_ylabel("span n (layers)")
    ax.set_title(f"Angular distance d_n(l) = arccos(cos(h_l, h_l+n)) / pi  ({tokens} tokens; x = lowest per span)", fontsize=9)
    fig.colorbar(image, ax=ax, label="angular distance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _summary(profile: LayerProfile, span: int, metrics: dict, count: int, seq_len: int) -> list[tuple[str, str]]:
    rows = [
        ("layers", str(profile.num_layers)),
        ("public text", f"{count} sequences x {seq_len} tokens"),
        ("throughput", f"{metrics['tokens_per_s']:.0f} tokens/s ({metrics['sequences_per_s']:.2f} sequences/s)"),
    ]
    blocks = most_redundant(profile, span)
    if not blocks:
        rows.append(
            (f"most redundant n={span}", f"not measured: prune.group_size {span} > profile.max_span {max(profile.distances)}")
        )
    for rank, (layer, distance) in enumerate(blocks, start=1):
        rows.append((f"most redundant n={span} #{rank}", f"layers {layer}..{layer + span - 1}  d = {distance:.4f}"))
    return rows
