"""Choosing what to prune beyond the paper's fixed (n, p) on SmolLM2: re-ranked blocks against the
oracle, and pruning to a storage budget against the headline's fixed n = 3, p = 3 (issue 13).

    python bench/prune_choice.py                     # both parts, about 10 minutes on 2 CPU cores
    python bench/prune_choice.py --out runs/prune-choice

Part 1, re-ranked block choice (n = 4, p = 1, as the issue measured): profile once, then prune by
angular distance alone and with `prune.rerank_top_k = K` (perplexity of each of the top-K blocks'
pruned model on 8 public *profiling* windows). Every one of the 25 candidate blocks is then
measured on the *held-out* WikiText-2 test windows (16 x 128 tokens): the oracle is the best of
them. Reported: held-out perplexity of the angular choice, the re-ranked choice, the oracle and the
median block; the re-rank's wall time against profile's.

Part 2, budget pruning: the budget is the client-model bytes of the headline's pruning (sgp n = 3,
p = 3, NF4 + double quant, int8 embeddings; measured here, in the same run, by quantize). The same
pipeline then runs with `prune.storage_budget` = those bytes. Reported for both: layers removed,
total angular distance, predicted and actual bytes, and held-out perplexity of the pruned bf16 and
deployed (quantized, aligned) sub-LLM as quantize measures it.

Every number comes from the fedsoda stages (through the CLI) or from the low-level perplexity
function on the same held-out windows; seed 0; the machine is whatever runs it (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = """
[run]
name = "{name}"
workdir = "{workdir}"
[model]
name = "smollm2-135m"
[public_data]
sequences = 32
seq_len = 128
heldout_sequences = 16
[prune]
{prune}
[align]
steps = 20
batch_size = 4
[quantize]
quant_type = "nf4"
embeddings = "int8"
"""


def fedsoda(spec: Path, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedsoda_cli", "run", str(spec), *args], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"fedsoda run {spec} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def write_spec(out: Path, name: str, prune: str) -> Path:
    path = out / f"{name}.toml"
    path.write_text(BASE.format(name=name, workdir=(out / name).as_posix(), prune=prune))
    return path


def manifest(workdir: Path, stage: str) -> dict:
    return json.loads((workdir / stage / "manifest.json").read_text())


def copy_stage(src: Path, dst: Path, stage: str) -> None:
    import shutil

    if not (dst / stage).exists():
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src / stage, dst / stage)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "prune-choice")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from fedsoda_cli.data.public import public_windows
    from fedsoda_cli.evaluation.perplexity import perplexity
    from fedsoda_cli.models.layers import drop_layers
    from fedsoda_cli.models.load import load_causal_lm
    from fedsoda_cli.spec import load_spec

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores; torch {torch.__version__}; seed 0",
        "",
    ]

    # ---- part 1: re-ranked block choice, n = 4, p = 1 ----
    angular = write_spec(out, "angular-n4", "group_size = 4\ngroups = 1")
    reranked = write_spec(out, "reranked-n4", f"group_size = 4\ngroups = 1\nrerank_top_k = {args.top_k}")
    fedsoda(angular, "--to", "prune")
    copy_stage(out / "angular-n4", out / "reranked-n4", "profile")
    fedsoda(reranked, "--to", "prune")
    profile_s = manifest(out / "angular-n4", "profile")["wall_time_s"]
    rerank = manifest(out / "reranked-n4", "prune")["metrics"]["rerank"]
    chosen = {
        name: json.loads((out / name / "prune" / "layer_map.json").read_text())["removed_groups"][0][0]
        for name in ("angular-n4", "reranked-n4")
    }

    spec = load_spec(angular)
    full, tokenizer = load_causal_lm(spec.model)
    heldout = public_windows(spec, "held-out", tokenizer)
    distances = json.loads((out / "angular-n4" / "profile" / "distances.json").read_text())
    num_layers = distances["num_layers"]
    del full
    starts = list(range(1, num_layers - 4))  # every block of 4 that spares layers 0 and L-1 (protected)
    ppl = {}
    started = time.perf_counter()
    for start in starts:
        model, _ = load_causal_lm(spec.model)
        drop_layers(model, list(range(start, start + 4)))
        ppl[start] = perplexity(model.eval(), heldout, batch_size=8).perplexity
        del model
    oracle_s = time.perf_counter() - started
    oracle = min(ppl, key=ppl.get)
    median = statistics.median(ppl.values())
    a, r = chosen["angular-n4"], chosen["reranked-n4"]
    lines += [
        "Re-ranked block choice (n = 4, p = 1), held-out WikiText-2 perplexity (16 x 128 test tokens):",
        "",
        "| choice | block | held-out ppl | vs oracle |",
        "|---|---|---|---|",
        f"| angular distance (sgp) | {a}..{a + 3} | {ppl[a]:.2f} | {ppl[a] / ppl[oracle]:.3f}x |",
        f"| re-ranked, top {args.top_k} by public ppl | {r}..{r + 3} | {ppl[r]:.2f} | {ppl[r] / ppl[oracle]:.3f}x |",
        f"| oracle (best of {len(starts)} blocks, held-out) | {oracle}..{oracle + 3} | {ppl[oracle]:.2f} | 1.000x |",
        f"| median block | - | {median:.2f} | {median / ppl[oracle]:.3f}x |",
        "",
        f"re-rank wall time {rerank['seconds']:.1f} s = {rerank['seconds'] / profile_s:.2f}x profile's {profile_s:.1f} s "
        f"(the oracle's {len(starts)} held-out measurements took {oracle_s:.1f} s)",
        f"goal: within 10 % of the oracle ({'met' if ppl[r] <= 1.1 * ppl[oracle] else 'missed'}), "
        f"at most 5x profile's wall time ({'met' if rerank['seconds'] <= 5 * profile_s else 'missed'})",
        "",
    ]
    print("\n".join(lines), flush=True)

    # ---- part 2: budget pruning against the headline's fixed n = 3, p = 3 ----
    fixed = write_spec(out, "fixed-n3p3", "group_size = 3\ngroups = 3")
    copy_stage(out / "angular-n4", out / "fixed-n3p3", "profile")
    fedsoda(fixed, "--to", "quantize")
    budget = manifest(out / "fixed-n3p3", "quantize")["metrics"]["client_model_bytes"]
    budgeted = write_spec(out, "budget", f"storage_budget = {budget}")
    copy_stage(out / "angular-n4", out / "budget", "profile")
    fedsoda(budgeted, "--to", "quantize")
    rows = []
    for name in ("fixed-n3p3", "budget"):
        layer_map = json.loads((out / name / "prune" / "layer_map.json").read_text())
        groups = layer_map["removed_groups"]
        total = sum(distances["distances"][str(len(g))][g[0]] for g in groups)
        q = manifest(out / name, "quantize")["metrics"]
        sb = q.get("storage_budget", {})
        rows.append(
            f"| {name} | {', '.join(f'{g[0]}..{g[-1]}' for g in groups)} | {sum(map(len, groups))} | {total:.4f} | "
            f"{sb.get('predicted_client_bytes', '-')} | {q['client_model_bytes']:,} | {q['heldout_ppl_sub_bf16']:.2f} | {q['heldout_ppl_sub_quantized']:.2f} |"
        )
    lines2 = [
        f"Budget pruning: budget = the fixed n = 3, p = 3 client model's {budget:,} B",
        "",
        "| pruning | removed groups | layers | total angular distance | predicted bytes | actual bytes | held-out ppl bf16 (aligned) | held-out ppl deployed |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    print("\n".join(lines2), flush=True)
    (out / "results.md").write_text("\n".join(lines + lines2))


if __name__ == "__main__":
    main()
