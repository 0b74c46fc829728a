"""Cost of profiling: `measure` (hooks + streaming angular distances) against a bare forward pass.

    python bench/profile_throughput.py                        # SmolLM2-135M, 8 x 128 tokens
    python bench/profile_throughput.py --model tiny-random-llama --sequences 32

Both sides run the same decoder stack (the base model, no lm_head: `measure` never computes
logits) on the same WikiText-2 batches, under the same `torch.no_grad()`, in the same process;
the only difference is the residual-stream hooks and the distance accumulation. Runs alternate
(bare, measure, bare, measure, ...) so drift in machine load hits both; reported are the ratio of
the minima (the least disturbed run of each side) and the median of the paired ratios
measure_i / bare_i (robust when the load changes during the run). Goal: time ratio <= 1.15.

Memory: tracemalloc does not see torch's allocations, and ru_maxrss is a high-water mark that the
model load (not the forward) usually sets. So each side runs once more in a FRESH subprocess that
loads the model, pages in its (memory-mapped) weights, records its RSS, then samples RSS with
psutil every 2 ms in a thread during the pass. Reported: peak RSS during the pass, and the increase over the RSS just before it. The
increase is a few tens of MiB on either side and varies by about +-20 MiB between identical runs
(glibc keeps freed activation buffers in the heap); `measure` itself holds only max_span + 1
float64 copies of one batch's tokens (2 with tokens = "last").
Prints a markdown table row at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

import psutil


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in model name (smollm2-135m, tiny-random-llama, ...)")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-span", type=int, default=8)
    parser.add_argument("--tokens", choices=["last", "all"], default="last")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the shared machines have few cores)")
    parser.add_argument("--child", choices=["bare", "measure"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def setup(args):
    """(model, input_ids) for the run, with torch sized to --threads."""
    import torch

    from fedsoda_cli.data.paths import resolve_data_dir
    from fedsoda_cli.data.public import public_sequences
    from fedsoda_cli.models.load import load_causal_lm
    from fedsoda_cli.spec.schema import DataSpec, ModelSpec

    torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm(ModelSpec(name=args.model))
    ids = public_sequences(resolve_data_dir(DataSpec(), None), "valid", tokenizer, args.sequences, args.seq_len)
    return model, ids


def bare_forward(model, ids, batch_size: int) -> None:
    """The decoder stack over the same batches as `measure`, without hooks."""
    import torch

    decoder = model.get_decoder()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        for begin in range(0, ids.shape[0], batch_size):
            decoder(input_ids=ids[begin : begin + batch_size], attention_mask=mask[begin : begin + batch_size], use_cache=False)


def profile_pass(model, ids, args) -> None:
    from fedsoda_cli.sgp.angular import measure

    measure(model, ids, None, args.max_span, args.tokens, args.batch_size)


def run_side(side: str, model, ids, args) -> None:
    if side == "bare":
        bare_forward(model, ids, args.batch_size)
    else:
        profile_pass(model, ids, args)


def time_sides(model, ids, args) -> dict[str, list[float]]:
    """Alternating timed runs after one untimed warm-up of each side."""
    times: dict[str, list[float]] = {"bare": [], "measure": []}
    for side in times:
        run_side(side, model, ids, args)
    for _ in range(args.repeats):
        for side in times:
            started = time.perf_counter()
            run_side(side, model, ids, args)
            times[side].append(time.perf_counter() - started)
    return times


def child_memory(args) -> None:
    """In a fresh process: RSS before the pass and its peak during it, as one JSON line (MiB)."""
    import gc

    import torch

    model, ids = setup(args)
    # Safetensors weights are memory-mapped: page them all in first, or the pass's RSS growth
    # would be mostly weights being read, identical on both sides.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.sum()
    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run_side(args.child, model, ids, args)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    print(json.dumps({"before_mib": before / 2**20, "peak_mib": peak[0] / 2**20}))


def memory_of(side: str, argv: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, *argv, "--child", side], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        child_memory(args)
        return
    model, ids = setup(args)
    times = time_sides(model, ids, args)
    del model
    memory = {side: memory_of(side, argv) for side in ("bare", "measure")}

    bare, prof = min(times["bare"]), min(times["measure"])
    paired = statistics.median(m / b for m, b in zip(times["measure"], times["bare"]))
    tokens = ids.numel()
    grow = {side: m["peak_mib"] - m["before_mib"] for side, m in memory.items()}
    print(
        f"model {args.model}, {args.sequences} x {args.seq_len} tokens, batch {args.batch_size}, "
        f"max_span {args.max_span}, tokens={args.tokens}, threads {args.threads}, {args.repeats} alternating runs"
    )
    print(f"bare forward : min {bare:.3f} s  (all: {', '.join(f'{t:.3f}' for t in times['bare'])})  {tokens / bare:.0f} tokens/s")
    print(
        f"measure      : min {prof:.3f} s  (all: {', '.join(f'{t:.3f}' for t in times['measure'])})  {tokens / prof:.0f} tokens/s"
    )
    print(f"time ratio   : {prof / bare:.3f}x of the minima, {paired:.3f}x median of paired runs (goal <= 1.15x)")
    for side, m in memory.items():
        print(
            f"memory {side:<7}: RSS {m['before_mib']:.0f} MiB before the pass, peak {m['peak_mib']:.0f} MiB (+{grow[side]:.0f} MiB)"
        )
    print()
    print(
        "| model | sequences x tokens | batch | bare forward (s) | measure (s) | time ratio (min / paired median) | peak RSS bare / measure (MiB) | peak ratio | pass increase bare / measure (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {args.sequences} x {args.seq_len} | {args.batch_size} | {bare:.3f} | {prof:.3f} | {prof / bare:.3f}x / {paired:.3f}x | "
        f"{memory['bare']['peak_mib']:.0f} / {memory['measure']['peak_mib']:.0f} | {memory['measure']['peak_mib'] / memory['bare']['peak_mib']:.3f}x | "
        f"{grow['bare']:.0f} / {grow['measure']:.0f} |"
    )


if __name__ == "__main__":
    main()
