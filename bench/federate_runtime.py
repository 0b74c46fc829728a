"""Benchmark: the federated runtime against a plain single-process peft training loop.

    python bench/federate_runtime.py                       # tiny random llama (seconds)
    python bench/federate_runtime.py --model smollm2-135m --steps 2 --max-len 64   # the real model

In one run, on the same NF4 client model and the same SST-2 batches:
  1. local-training throughput (steps/s) inside a worker process vs a plain peft loop in this
     process with the same torch threads (goal >= 0.9x);
  2. share of round wall time spent outside local training, 4 clients per round (goal <= 5 %):
     1 - (busiest worker's seconds inside the training loop) / (round wall time incl. checkpoint);
  3. model loads per worker over the rounds (goal 1);
  4. worker resident memory after the last round vs after round 1 (goal <= +5 %);
  5. 1 vs 2 worker processes (round wall time).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedsoda_cli.federated.checkpoint import CheckpointStore
from fedsoda_cli.federated.client import LocalTraining, batch_order, lora_config
from fedsoda_cli.federated.local import LocalWorkerPool
from fedsoda_cli.federated.server import FederatedServer, RoundPlan, RoundReporter
from fedsoda_cli.federated.worker import WorkerSetup
from fedsoda_cli.models.adapters import LoraShape
from fedsoda_cli.plugins import aggregators
from fedsoda_cli.spec.schema import LoraSpec

CLIENTS = 4


def build_client_model(name: str, folder: Path) -> Path:
    """The built-in model `name`, quantized to NF4 and saved as the quantize stage saves it."""
    from fedsoda_cli.models.load import load_causal_lm, save_checkpoint
    from fedsoda_cli.models.quantized import quantize_checkpoint, save_client_model
    from fedsoda_cli.spec.schema import ModelSpec, QuantizeSpec

    model, tokenizer = load_causal_lm(ModelSpec(name=name))
    save_checkpoint(model, tokenizer, folder / "float")
    del model
    return save_client_model(quantize_checkpoint(folder / "float", QuantizeSpec()), tokenizer, folder / "client")


def client_shards(per_client: int) -> dict[int, list[tuple[str, str]]]:
    from fedsoda_cli.data.paths import resolve_data_dir
    from fedsoda_cli.data.tasks import load_task
    from fedsoda_cli.spec.schema import DataSpec, TaskSpec

    examples = load_task(
        TaskSpec(name="sst2", train_examples=CLIENTS * per_client), resolve_data_dir(DataSpec(), None), "train", seed=0
    )
    return {c: [(e.prompt, e.answer) for e in examples[c * per_client : (c + 1) * per_client]] for c in range(CLIENTS)}


def plain_peft_steps_per_s(
    model_dir: Path, shard, lora: LoraSpec, steps: int, batch_size: int, max_len: int, threads: int, repeats: int
) -> float:
    """A textbook peft loop in this process: load, get_peft_model, AdamW, sft batches; steps/s."""
    import numpy as np
    from peft import get_peft_model

    from fedsoda_cli.data.sft import sft_batch
    from fedsoda_cli.data.tasks import Example
    from fedsoda_cli.models.quantized import load_client_model

    torch.set_num_threads(threads)
    model, tokenizer = load_client_model(model_dir, compute_dtype=torch.float32)
    model = get_peft_model(model, lora_config(lora))
    examples = [Example(str(i), p, a, None, None) for i, (p, a) in enumerate(shard)]
    rates = []
    for repeat in range(repeats):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
        order = batch_order(len(examples), steps * batch_size, np.random.default_rng(repeat))
        model.train()
        started = time.perf_counter()
        for step in range(steps):
            batch = sft_batch([examples[i] for i in order[step * batch_size : (step + 1) * batch_size]], tokenizer, max_len)
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
        rates.append(steps / (time.perf_counter() - started))
    return statistics.median(rates)


class RoundClock(RoundReporter):
    """Wall time of each whole round (dispatch to checkpoint written)."""

    def __init__(self):
        self.seconds: list[float] = []

    def round_started(self, round, clients):
        self._started = time.perf_counter()

    def round_finished(self, record):
        self.seconds.append(time.perf_counter() - self._started)


def federated_run(
    model_dir: Path,
    shards,
    lora: LoraSpec,
    workers: int,
    threads: int,
    rounds: int,
    steps: int,
    batch_size: int,
    max_len: int,
    folder: Path,
) -> dict:
    training = LocalTraining(
        local_steps=steps, batch_size=batch_size, lr=1e-3, optimizer="adamw", max_grad_norm=1.0, proximal_mu=0.01, max_len=max_len
    )
    setup = WorkerSetup(
        model_dir=str(model_dir), lora=LoraShape.from_spec(lora), lora_seed=1, threads=threads, training=training, shards=shards
    )
    plan = RoundPlan(seed=0, clients=CLIENTS, clients_per_round=CLIENTS, rounds=rounds)
    store = CheckpointStore(folder / f"ckpt-{workers}", {"bench": "1"}, lora_config(lora))
    clock = RoundClock()
    transport = LocalWorkerPool(setup, workers=workers, task_timeout_s=3600, log=print)
    started = time.perf_counter()
    result = FederatedServer(plan, transport, aggregators.create("fedavg", seed=0), "fedavg", store, reporter=clock).run()
    history = result.history
    busiest = [max(h.train_seconds_by_worker.values()) for h in history]
    return {
        "workers": workers,
        "threads": threads,
        "wall_s": time.perf_counter() - started,
        "round_s": statistics.mean(clock.seconds[1:] or clock.seconds),
        "outside_share": statistics.mean(1 - b / s for b, s in zip(busiest[1:] or busiest, clock.seconds[1:] or clock.seconds)),
        "worker_steps_per_s": CLIENTS * rounds * steps / sum(h.train_seconds for h in history),
        "model_loads": result.transport["model_loads"],
        "rss_first": history[0].worker_rss_mb,
        "rss_last": history[-1].worker_rss_mb,
        "loss": (history[0].train_loss, history[-1].train_loss),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="local steps per client per round")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="cores to use in all")
    args = parser.parse_args(argv)
    lora = LoraSpec(r=8, alpha=16)
    shards = client_shards(per_client=16)
    with tempfile.TemporaryDirectory(prefix="fedsoda-bench-") as tmp:
        folder = Path(tmp)
        torch.set_num_threads(args.threads)
        model_dir = build_client_model(args.model, folder)
        runs = [
            federated_run(
                model_dir,
                shards,
                lora,
                w,
                max(1, args.threads // w),
                args.rounds,
                args.steps,
                args.batch_size,
                args.max_len,
                folder,
            )
            for w in (1, 2)
        ]
        plain = plain_peft_steps_per_s(
            model_dir, shards[0], lora, args.steps * CLIENTS, args.batch_size, args.max_len, args.threads, repeats=3
        )
    report(args, runs, plain)


def report(args, runs: list[dict], plain: float) -> None:
    one, two = runs
    rows = [
        (
            "local training throughput, worker vs plain peft loop (same threads)",
            f"{one['worker_steps_per_s']:.2f} vs {plain:.2f} steps/s = {one['worker_steps_per_s'] / plain:.2f}x",
            ">= 0.9x",
        ),
        ("round time outside local training, 4 clients, 1 worker", f"{100 * one['outside_share']:.1f} %", "<= 5 %"),
        ("round time outside local training, 4 clients, 2 workers", f"{100 * two['outside_share']:.1f} %", "<= 5 %"),
        (
            f"model loads per worker over {args.rounds} rounds",
            f"1 worker: {one['model_loads']}; 2 workers: {two['model_loads']}",
            "1",
        ),
        (
            f"worker RSS after round {args.rounds} vs round 1",
            "; ".join(
                f"{r['workers']} worker(s): {r['rss_first']:.0f} -> {r['rss_last']:.0f} MiB ({100 * (r['rss_last'] / r['rss_first'] - 1):+.1f} %)"
                for r in runs
            ),
            "<= +5 %",
        ),
        (
            "round wall time, 1 vs 2 workers",
            f"{one['round_s']:.2f} s ({one['threads']} threads) vs {two['round_s']:.2f} s (2 x {two['threads']} threads) = {one['round_s'] / two['round_s']:.2f}x",
            "-",
        ),
        ("run wall time incl. worker start, 1 vs 2 workers", f"{one['wall_s']:.1f} s vs {two['wall_s']:.1f} s", "-"),
        ("train loss round 1 -> last", f"{one['loss'][0]:.3f} -> {one['loss'][1]:.3f}", "-"),
    ]
    print(
        f"\n### federate runtime: {args.model}, {CLIENTS} clients/round, {args.rounds} rounds, {args.steps} local steps x batch {args.batch_size}, max_len {args.max_len}, {args.threads} cores\n"
    )
    print("| measure | result | goal |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
