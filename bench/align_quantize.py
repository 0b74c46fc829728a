"""ODA alignment speed/memory, client-model bytes and perplexity on SmolLM2 with 9 of 30 layers pruned.

    python bench/align_quantize.py                         # 3 groups of 3 layers, 8 steps of 4 x 128 tokens
    python bench/align_quantize.py --steps 20 --heldout 16 --groups 12-14,18-20,24-26

Default groups: what `sgp` (n=3, p=3, not iterative) removes after profiling 8 x 128 WikiText-2
valid windows: 10-12, 13-15, 16-18, which touch and so form one gap before layer 19.

1. Align (after_gap partial layers, AdamW) with the KL computed in checkpointed chunks of
   --logit-chunk tokens, against the baseline of one chunk holding every token of the batch (all
   logits alive at once), each in a FRESH subprocess (ru_maxrss is a high-water mark and freed
   memory is not always returned to the OS, so two phases in one process would hide the second
   one's peak). Each child samples its RSS with psutil every 5 ms during the steps. Reported:
   steps/s, peak RSS during the steps and its increase over the RSS just before them.
2. Client model bytes of the aligned sub-LLM: NF4 + double quant with bf16 embeddings vs int8
   embeddings, against the full model in bf16 (parameter count x 2 bytes, computed).
3. Perplexity on WikiText-2 test windows of: full LLM, pruned sub-LLM, aligned sub-LLM, and the
   quantized aligned sub-LLM (as clients load it), in one table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--groups", default="10-12,13-15,16-18", help="removed groups, original indices: a-b,c-d,...")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--train", type=int, default=16, help="WikiText-2 valid windows to align on")
    parser.add_argument("--heldout", type=int, default=8, help="WikiText-2 test windows for perplexity")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--logit-chunk", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child-chunk", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-save", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def groups_of(text: str) -> list[list[int]]:
    out = []
    for part in text.split(","):
        a, b = (int(x) for x in part.split("-"))
        out.append(list(range(a, b + 1)))
    return out


def load(args):
    """(teacher, student, kept, tokenizer) with torch sized to --threads."""
    import copy

    import torch

    from fedsoda_cli.models.layers import drop_layers
    from fedsoda_cli.models.load import load_causal_lm
    from fedsoda_cli.spec.schema import ModelSpec

    torch.set_num_threads(args.threads)
    teacher, tokenizer = load_causal_lm(ModelSpec(name=args.model))
    student = copy.deepcopy(teacher)
    kept = drop_layers(student, [layer for g in groups_of(args.groups) for layer in g])
    return teacher, student, kept, tokenizer


def windows(tokenizer, split: str, n: int, seq_len: int):
    from fedsoda_cli.data.paths import resolve_data_dir
    from fedsoda_cli.data.public import public_sequences
    from fedsoda_cli.spec.schema import DataSpec

    return public_sequences(resolve_data_dir(DataSpec(), None), split, tokenizer, n, seq_len)


# ---- child: one alignment run ------------------------------------------------------------------


def child(args) -> None:
    from fedsoda_cli.models.load import save_checkpoint
    from fedsoda_cli.oda.distill import align_partial_layers, seeded_batches
    from fedsoda_cli.spec.schema import AlignSpec

    teacher, student, kept, tokenizer = load(args)
    train = windows(tokenizer, "valid", args.train, args.seq_len)
    config = AlignSpec(lr=args.lr, batch_size=args.batch_size, logit_chunk=args.child_chunk)
    process = psutil.Process()
    rss_before = process.memory_info().rss
    peak, done = [rss_before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    history = align_partial_layers(
        teacher, student, kept, groups_of(args.groups), "after_gap", seeded_batches(train, args.batch_size, 0), config, args.steps
    )
    elapsed = time.perf_counter() - started
    done.set()
    sampler.join()
    if args.child_save:
        save_checkpoint(student, tokenizer, args.child_save)
    print(
        json.dumps(
            {
                "steps_per_s": args.steps / elapsed,
                "peak_rss_mb": peak[0] / 2**20,
                "increase_mb": (peak[0] - rss_before) / 2**20,
                "first_loss": history[0]["loss"],
                "last_loss": history[-1]["loss"],
            }
        )
    )


def run_child(args, chunk: int, save: str | None) -> dict:
    command = [
        sys.executable,
        __file__,
        "--model",
        args.model,
        "--groups",
        args.groups,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--train",
        str(args.train),
        "--lr",
        str(args.lr),
        "--threads",
        str(args.threads),
        "--child-chunk",
        str(chunk),
    ]
    if save:
        command += ["--child-save", save]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- main --------------------------------------------------------------------------------------


def main(args) -> None:
    import torch

    from fedsoda_cli.evaluation.perplexity import perplexity
    from fedsoda_cli.models import quantized
    from fedsoda_cli.models.load import load_checkpoint, save_checkpoint
    from fedsoda_cli.spec.schema import QuantizeSpec
    from fedsoda_cli.stages.quantize import parameter_counts

    with tempfile.TemporaryDirectory(prefix="bench-align-") as scratch:
        scratch = Path(scratch)
        all_tokens = args.batch_size * args.seq_len
        chunked = run_child(args, args.logit_chunk, str(scratch / "aligned"))
        whole = run_child(args, all_tokens, None)

        teacher, student, kept, tokenizer = load(args)
        heldout = windows(tokenizer, "test", args.heldout, args.seq_len)
        aligned, _ = load_checkpoint(scratch / "aligned", dtype=torch.float32)
        save_checkpoint(student, tokenizer, scratch / "pruned")
        params_sub, params_full = parameter_counts(aligned, len(kept) + sum(len(g) for g in groups_of(args.groups)))
        full_bf16 = 2 * params_full

        sizes, clients = {}, {}
        for emb in ("bf16", "int8"):
            client = quantized.quantize_checkpoint(scratch / "aligned", QuantizeSpec(embeddings=emb))
            quantized.save_client_model(client, tokenizer, scratch / f"client-{emb}")
            sizes[emb] = (
                quantized.weight_file_bytes(scratch / f"client-{emb}"),
                quantized.folder_bytes(scratch / f"client-{emb}"),
            )
            clients[emb] = quantized.load_client_model(scratch / f"client-{emb}", prepare_for_training=False)[0]
            del client

        ppl = {}
        for name, model in [
            ("full LLM", teacher),
            ("pruned sub-LLM", student),
            ("aligned sub-LLM", aligned),
            ("aligned, NF4 (bf16 emb.)", clients["bf16"]),
            ("aligned, NF4 (int8 emb.)", clients["int8"]),
        ]:
            ppl[name] = perplexity(model, heldout, batch_size=args.batch_size).perplexity

    print(
        f"\nSmolLM2-135M, removed {args.groups} ({len(kept)} of {len(kept) + sum(len(g) for g in groups_of(args.groups))} layers kept), "
        f"{args.steps} steps of {args.batch_size} x {args.seq_len} tokens, {args.threads} thread(s)\n"
    )
    print("| align, KL logits | steps/s | peak RSS (MB) | increase during steps (MB) | loss first -> last |")
    print("|---|---:|---:|---:|---|")
    for label, r in [
        (f"chunks of {args.logit_chunk} tokens (checkpointed)", chunked),
        (f"one chunk of {all_tokens} (baseline)", whole),
    ]:
        print(
            f"| {label} | {r['steps_per_s']:.3f} | {r['peak_rss_mb']:.0f} | {r['increase_mb']:.0f} | {r['first_loss']:.4f} -> {r['last_loss']:.4f} |"
        )
    print("\n| model | bytes | vs full bf16 |")
    print("|---|---:|---:|")
    print(f"| full LLM, bf16 (computed: {params_full:,} params x 2) | {full_bf16:,} | - |")
    print(
        f"| sub-LLM, bf16 (computed: {params_sub:,} params x 2) | {2 * params_sub:,} | {100 * (1 - params_sub / params_full):.1f} % smaller |"
    )
    for emb, (weights, total) in sizes.items():
        print(f"| client NF4+DQ, {emb} embeddings: weights | {weights:,} | {100 * (1 - weights / full_bf16):.1f} % smaller |")
        print(
            f"| client NF4+DQ, {emb} embeddings: whole folder (+config, tokenizer) | {total:,} | {100 * (1 - total / full_bf16):.1f} % smaller |"
        )
    print(f"\n| model | perplexity, WikiText-2 test ({args.heldout} x {args.seq_len}) |")
    print("|---|---:|")
    for name, value in ppl.items():
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    arguments = parse_args()
    child(arguments) if arguments.child_chunk else main(arguments)
