"""ODA on the deployed client model: each `align.quant_aware` design on SmolLM2, 9 of 30 layers pruned.

    python bench/oda_deployed.py                       # the designs below, 20 steps of 4 x 128 tokens each
    python bench/oda_deployed.py --designs ste,ste@1e-3 --steps 40
    python bench/oda_deployed.py --designs off --partial all_kept --beta 10

Default groups: what `sgp` (n=3, p=3, not iterative) removes after profiling 8 x 128 WikiText-2
valid windows (bench/align_quantize.py): 10-12, 13-15, 16-18, which touch and so form one gap
before layer 19. Pass --groups for another pruning (e.g. what a run's prune/layer_map.json says).

For each design (a `quant_aware` value, optionally @lr): a fresh copy of the pruned sub-LLM is
aligned with the ODA loss exactly as the align stage does (`distill.align_partial_layers` with the
client format of a default [quantize], NF4 + double quantization), and measured on held-out
WikiText-2 test windows against the full LLM, before and after, in bf16 and as deployed
(`distill.measure`: the client model emulated in float). With --check-real (default) the aligned
model is also quantized with bitsandbytes as the quantize stage does and measured as clients load
it, to confirm the emulation. Printed: one markdown table per design and one of the goals:
  hidden NMSE after <= 0.5 x before at every gap (deployed),
  KL(deployed aligned) <= 0.6 x KL(deployed unaligned),
  ppl(deployed aligned) <= 1.2 x ppl(bf16 aligned).
The deployed unaligned control is the pruned model in the same client format (for bf16_partial:
its partial layers in bf16 too), so the KL ratio isolates what alignment did.

Sized for 2 CPU cores: about 2-3 minutes per design at the defaults (6 designs: ~15-20 minutes).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

DESIGNS = "off,frozen_rest,ste,bf16_partial,ste@1e-3,frozen_rest@1e-3"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--groups", default="10-12,13-15,16-18", help="removed groups, original indices: a-b,c-d,...")
    parser.add_argument("--designs", default=DESIGNS, help="comma-separated quant_aware values, each optionally @lr")
    parser.add_argument("--partial", default="after_gap")
    parser.add_argument("--hidden-at", default="output", choices=["output", "gap"])
    parser.add_argument("--hidden-norm", default="token", choices=["token", "pooled"], help="align.hidden_norm")
    parser.add_argument("--beta", type=float, default=1.0, help="align.beta, the hidden term's weight (align.alpha stays 1)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--train", type=int, default=32, help="WikiText-2 valid windows to align on")
    parser.add_argument("--heldout", type=int, default=16, help="WikiText-2 test windows to measure on")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of designs without @lr")
    parser.add_argument("--logit-chunk", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--check-real",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the bitsandbytes client model of each aligned sub-LLM",
    )
    parser.add_argument("--json", help="also write every measurement to this file")
    return parser.parse_args(argv)


def groups_of(text: str) -> list[list[int]]:
    out = []
    for part in text.split(","):
        a, b = (int(x) for x in part.split("-"))
        out.append(list(range(a, b + 1)))
    return out


def designs_of(text: str, lr: float) -> list[tuple[str, str, float]]:
    """(label, quant_aware, lr) per design."""
    out = []
    for item in text.split(","):
        name, _, rate = item.strip().partition("@")
        out.append((item.strip(), name, float(rate) if rate else lr))
    return out


def windows(tokenizer, split: str, n: int, seq_len: int):
    from fedsoda_cli.data.paths import resolve_data_dir
    from fedsoda_cli.data.public import public_sequences
    from fedsoda_cli.spec.schema import DataSpec

    return public_sequences(resolve_data_dir(DataSpec(), None), split, tokenizer, n, seq_len)


def real_client(student, tokenizer, partial: list[int], quant_aware: str, scratch: Path):
    """The aligned sub-LLM as the quantize stage stores it and a client loads it."""
    import torch

    from fedsoda_cli.models import quantized
    from fedsoda_cli.models.load import save_checkpoint
    from fedsoda_cli.spec.schema import QuantizeSpec

    save_checkpoint(student, tokenizer, scratch / "float")
    client = quantized.quantize_checkpoint(
        scratch / "float", QuantizeSpec(), bf16_layers=partial if quant_aware == "bf16_partial" else []
    )
    quantized.save_client_model(client, tokenizer, scratch / "client")
    del client
    return quantized.load_client_model(scratch / "client", torch.float32, prepare_for_training=False)[0]


def mark(ok: bool) -> str:
    return "yes" if ok else "NO"


def main(args) -> None:
    import torch

    from fedsoda_cli.models.layers import drop_layers
    from fedsoda_cli.models.load import load_causal_lm
    from fedsoda_cli.oda.distill import align_partial_layers, evaluate_alignment, measure, partial_layers, seeded_batches
    from fedsoda_cli.spec.schema import AlignSpec, ModelSpec, QuantizeSpec

    torch.set_num_threads(args.threads)
    started_all = time.perf_counter()
    teacher, tokenizer = load_causal_lm(ModelSpec(name=args.model))
    groups = groups_of(args.groups)
    pruned = copy.deepcopy(teacher)
    kept = drop_layers(pruned, [layer for g in groups for layer in g])
    train = windows(tokenizer, "valid", args.train, args.seq_len)
    heldout = windows(tokenizer, "test", args.heldout, args.seq_len)
    quant = QuantizeSpec()
    partial = partial_layers(args.partial, kept, groups)
    results = []
    for label, quant_aware, lr in designs_of(args.designs, args.lr):
        config = AlignSpec(
            partial=args.partial,
            hidden_at=args.hidden_at,
            hidden_norm=args.hidden_norm,
            beta=args.beta,
            quant_aware=quant_aware,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=lr,
            logit_chunk=args.logit_chunk,
        )
        student = copy.deepcopy(pruned)
        before = measure(teacher, student, kept, groups, heldout, config, quant, partial)
        started = time.perf_counter()
        history = align_partial_layers(
            teacher,
            student,
            kept,
            groups,
            args.partial,
            seeded_batches(train, args.batch_size, 0),
            config,
            args.steps,
            quant=quant,
        )
        align_s = time.perf_counter() - started
        after = measure(teacher, student, kept, groups, heldout, config, quant, partial)
        real = None
        if args.check_real:
            with tempfile.TemporaryDirectory(prefix="bench-oda-") as scratch:
                client = real_client(student, tokenizer, partial, quant_aware, Path(scratch))
                real = evaluate_alignment(teacher, client, kept, groups, heldout, config)
                del client
        results.append(
            {
                "design": label,
                "quant_aware": quant_aware,
                "lr": lr,
                "align_s": align_s,
                "wall_s": time.perf_counter() - started,
                "first_loss": history[0]["loss"] if history else None,
                "last_loss": history[-1]["loss"] if history else None,
                "before": before,
                "after": after,
                "real": real,
            }
        )
        print(f"[{label}] done in {results[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
        del student

    print(
        f"\n{args.model}, removed {args.groups} ({len(kept)} of {len(kept) + sum(map(len, groups))} layers kept), partial "
        f"{args.partial} = layers {[kept[k] for k in partial]}, hidden at {args.hidden_at} ({args.hidden_norm} NMSE, beta {args.beta:g}), {args.steps} steps of "
        f"{args.batch_size} x {args.seq_len} tokens, {args.train} train / {args.heldout} held-out windows, NF4 + double quant, "
        f"{args.threads} thread(s); full LLM ppl {results[0]['after']['bf16']['ppl_teacher']:.2f}\n"
    )
    for r in results:
        b, a = r["before"], r["after"]
        print(
            f"### {r['design']} (lr {r['lr']:g}, align {r['align_s']:.0f} s, loss {r['first_loss']:.4f} -> {r['last_loss']:.4f})\n"
        )
        print(
            "| model | KL (held-out) | "
            + " | ".join(f"hidden NMSE gap {g}" for g in b["bf16"]["hidden_nmse"])
            + " | perplexity |"
        )
        print("|---|---:|" + "---:|" * len(b["bf16"]["hidden_nmse"]) + "---:|")
        rows = [
            ("pruned, bf16", b["bf16"]),
            ("aligned, bf16", a["bf16"]),
            ("deployed unaligned (control)", b["deployed"]),
            ("deployed aligned (emulated)", a["deployed"]),
        ]
        if r["real"]:
            rows.append(("deployed aligned (bitsandbytes client)", r["real"]))
        for name, m in rows:
            print(
                f"| {name} | {m['kl']:.4f} | "
                + " | ".join(f"{v:.4f}" for v in m["hidden_nmse"].values())
                + f" | {m['ppl_student']:.2f} |"
            )
        print()

    print("### goals\n")
    print(
        "| design | hidden NMSE after / before, every gap (deployed) <= 0.5 | KL deployed aligned / unaligned <= 0.6 | "
        "ppl deployed aligned / bf16 aligned <= 1.2 | wall s |"
    )
    print("|---|---|---|---|---:|")
    for r in results:
        b, a = r["before"]["deployed"], r["after"]["deployed"]
        ratios = [a["hidden_nmse"][g] / max(v, 1e-12) for g, v in b["hidden_nmse"].items()]
        kl = a["kl"] / max(b["kl"], 1e-12)
        ppl = a["ppl_student"] / r["after"]["bf16"]["ppl_student"]
        print(
            f"| {r['design']} | {', '.join(f'{x:.2f}' for x in ratios)} ({mark(all(x <= 0.5 for x in ratios))}) | "
            f"{kl:.2f} ({mark(kl <= 0.6)}) | {ppl:.2f} ({mark(ppl <= 1.2)}) | {r['wall_s']:.0f} |"
        )
    print(f"\ntotal {time.perf_counter() - started_all:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(parse_args())
