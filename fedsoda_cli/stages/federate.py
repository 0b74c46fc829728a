"""Stage 5, federate: K clients fine-tune the global LoRA adapter of the quantized sub-LLM.

In: `quantize/` (model/ = the client model, layer_map.json) and the spec's [task], [lora],
[federate] (and [realign]) sections. Out, in the stage folder:
  adapter/          the final global adapter (PEFT format, for the sub-LLM)
  metrics.jsonl     one line per round: clients, exclusions, loss, bytes, seconds, step time, and
                    on evaluation rounds (federate.eval_every) the validation scores per target
  summary.json      totals: bytes by kind and per client, rounds, final loss, wall time, model loads
  partition.json    which examples each client holds (sizes, label histograms, indices)
  aggregator.*      the aggregator's state after the last round
  checkpoints/      a copy of the last round checkpoint
Round checkpoints are written as the run goes into `<workdir>/federate.checkpoints/`, outside the
stage folder (which only appears when the stage completes), so `--resume` survives a killed run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from fedsoda_cli import artifacts, terminal
from fedsoda_cli.data.partition import client_shards
from fedsoda_cli.errors import ArtifactError, SpecError
from fedsoda_cli.federated.accounting import model_download_bytes
from fedsoda_cli.federated.checkpoint import CheckpointStore, write_peft_adapter, write_state
from fedsoda_cli.federated.client import LocalTraining, lora_config
from fedsoda_cli.federated.console import ConsoleReporter, partition_table
from fedsoda_cli.federated.server import FederatedServer, RoundPlan, RunResult
from fedsoda_cli.federated.worker import WorkerSetup
from fedsoda_cli.models.layer_map import LAYER_MAP, LayerMap, read_layer_map
from fedsoda_cli.plugins import aggregators
from fedsoda_cli.round_record import EvalEntry
from fedsoda_cli.seeding import stable_seed
from fedsoda_cli.spec import Spec, sections_hash
from fedsoda_cli.stages.contract import StageContext, StageResult

CHECKPOINTS = "federate.checkpoints"


def run(ctx: StageContext) -> StageResult:
    shards, stats = client_shards(ctx.spec, ctx.out)
    ctx.console.print(partition_table(stats))
    summary = federate(ctx, shards, ctx.out, CHECKPOINTS)
    metrics = {k: v for k, v in summary.items() if k != "bytes_per_client"}  # per-client bytes stay in summary.json
    return StageResult(metrics=metrics, summary=summary_rows(summary))


def federate(ctx: StageContext, shards: dict[int, list[tuple[str, str]]], out: Path, checkpoints: str) -> dict[str, Any]:
    """The rounds over `shards` (client -> examples), outputs written into `out`, round checkpoints
    into `<workdir>/<checkpoints>`; returns the summary."""
    spec, fed = ctx.spec, ctx.spec.federate
    started = time.perf_counter()
    aggregator = aggregators.create(fed.aggregator, seed=stable_seed(spec.run.seed, "aggregator"), **fed.aggregator_options)
    model_dir = client_model_dir(ctx)
    layer_map = read_layer_map(ctx.inputs["quantize"] / LAYER_MAP)
    lora_layers = client_lora_layers(spec, layer_map)
    peft_config = lora_config(spec.lora, lora_layers, decoder_layers_name(model_dir) if lora_layers is not None else "layers")
    store = CheckpointStore(ctx.workdir / checkpoints, run_identity(ctx), peft_config)
    resume = resume_point(ctx, store)
    transport = client_transport(worker_setup(spec, model_dir, shards, lora_layers), spec, ctx.console)
    reporter = ConsoleReporter(ctx.console)
    realigner = realigner_for(ctx, layer_map)
    server = FederatedServer(
        plan_of(spec),
        transport,
        aggregator,
        fed.aggregator,
        store,
        realigner=realigner,
        reporter=reporter,
        model_bytes=model_download_bytes(model_dir),
        evaluator=evaluator_for(ctx, model_dir, peft_config, lora_layers),
        held_layers=held_layers_for(spec, model_dir) if realigner is not None else None,
    )
    try:
        result = server.run(resume)
    finally:
        reporter.stop()
    return write_outputs(ctx, out, store, result, peft_config, time.perf_counter() - started)


def client_model_dir(ctx: StageContext) -> Path:
    folder = ctx.inputs["quantize"] / "model"
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: the quantize stage output has no model/ folder; rerun `fedsoda quantize SPEC`")
    return folder


def client_lora_layers(spec: Spec, layer_map: LayerMap) -> list[int] | None:
    """lora.layers (original layer indices) as indices of the client model's layers, or None (all)."""
    if spec.lora.layers is None:
        return None
    kept = layer_map.kept
    absent = [layer for layer in spec.lora.layers if layer not in kept]
    if absent:
        raise SpecError(f"lora.layers: original layer(s) {absent} were pruned away; the client model holds layers {kept}")
    return sorted(kept.index(layer) for layer in spec.lora.layers)


def decoder_layers_name(model_dir: Path) -> str:
    """The name of the client model's decoder-layer list ("layers" for llama, qwen2, ...), read off
    a weightless copy of its architecture; PEFT needs it to put LoRA on chosen layers only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedsoda_cli.models.layers import decoder_layers_path

    config = AutoConfig.from_pretrained(model_dir)
    config.quantization_config = None  # the skeleton has no weights to quantize
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return decoder_layers_path(skeleton).rsplit(".", 1)[-1]


def evaluator_for(ctx: StageContext, model_dir: Path, peft_config, lora_layers: list[int] | None):
    """The server's per-round evaluator when federate.eval_every asks for one, else None."""
    spec = ctx.spec
    if not spec.federate.eval_every:
        return None
    from fedsoda_cli.data.tasks import validation_slice
    from fedsoda_cli.federated.evaluator import ServerEvaluator

    examples = validation_slice(spec, f"federate.eval_every = {spec.federate.eval_every}", "set federate.eval_every = 0")

    ctx.console.print(
        f"per-round evaluation every {spec.federate.eval_every} round(s) on {len(examples)} validation examples: "
        f"{', '.join(spec.federate.eval_targets)}",
        highlight=False,
    )
    return ServerEvaluator(
        spec, model_dir, ctx.inputs["quantize"] / LAYER_MAP, peft_config, lora_layers, examples, spec.federate.eval_targets
    )


def run_identity(ctx: StageContext) -> dict[str, str]:
    """What a checkpoint must match to be resumed: the federate spec sections and the inputs."""
    identity = {"spec_hash": sections_hash(ctx.spec, ctx.sections)}
    # realignment reads the align stage's float sub-LLM too, so its output must match as well
    for name in [*ctx.inputs, *(["align"] if realigns(ctx.spec) else [])]:
        manifest = artifacts.read_manifest(ctx.workdir, name)
        identity[name] = manifest.digest() if manifest else ""
    return identity


def resume_point(ctx: StageContext, store: CheckpointStore):
    """The checkpoint to continue from (with --resume), else None after clearing old ones."""
    if ctx.options.get("resume"):
        checkpoint = store.latest()
        if checkpoint is None:
            ctx.console.print(f"no checkpoint in {escape(str(store.folder))}; starting at round 1")
        return checkpoint
    dropped = store.clear()
    if dropped:
        ctx.console.print(
            f"starting afresh: removed {dropped} checkpoint(s) of an earlier run in {escape(str(store.folder))} (--resume continues one)"
        )
    return None


def held_layers_for(spec: Spec, model_dir: Path):
    """What every client holds of the client model, for realignment deltas (None: ship whole layers)."""
    from fedsoda_cli.federated.layer_delta import HeldLayers
    from fedsoda_cli.models.quantized import WEIGHTS

    return HeldLayers(model_dir / WEIGHTS) if spec.federate.realign_wire == "delta" else None


def plan_of(spec: Spec) -> RoundPlan:
    fed = spec.federate
    return RoundPlan(
        seed=spec.run.seed,
        clients=fed.clients,
        clients_per_round=fed.clients_per_round,
        rounds=fed.rounds,
        min_clients=fed.min_clients,
        max_update_norm=fed.max_update_norm,
        realign_every=fed.realign_every,
        weighting=fed.weighting,
        eval_every=fed.eval_every,
        wire_dtype=fed.wire_dtype,
        realign_when=fed.realign_when,
        drift_threshold=fed.drift_threshold,
    )


def worker_setup(
    spec: Spec, model_dir: Path, shards: dict[int, list[tuple[str, str]]], lora_layers: list[int] | None
) -> WorkerSetup:
    """The one place the spec becomes the workers' setup (the local pool's and every Flower site's)."""
    from fedsoda_cli.data.tasks import trains_eos
    from fedsoda_cli.models.adapters import LoraShape

    fed = spec.federate
    training = LocalTraining(
        local_steps=fed.local_steps,
        batch_size=fed.batch_size,
        lr=fed.lr,
        optimizer=fed.optimizer,
        max_grad_norm=fed.max_grad_norm,
        proximal_mu=fed.proximal_mu,
        max_len=spec.task.max_len,
        train_eos=trains_eos(spec.task),
    )
    return WorkerSetup(
        model_dir=str(model_dir),
        lora=LoraShape.from_spec(spec.lora),
        lora_seed=stable_seed(spec.run.seed, "lora-init"),
        threads=worker_threads(spec),
        training=training,
        shards=shards,
        lora_layers=tuple(lora_layers) if lora_layers is not None else None,
        wire_dtype=spec.federate.wire_dtype,
    )


def worker_threads(spec: Spec) -> int:
    """Torch threads per worker: the cores (run.threads, else all available) split across workers."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, (spec.run.threads or available) // spec.federate.workers)


def client_transport(setup: WorkerSetup, spec: Spec, console):
    """The transport federate.backend names: local worker processes, or a Flower deployment."""
    if spec.federate.backend == "flower":
        from fedsoda_cli.federated.flower.transport import flower_transport

        return flower_transport(setup, spec, log=lambda line: console.print(f"[yellow]{escape(line)}[/]", highlight=False))
    return local_transport(setup, spec, console)


def local_transport(setup: WorkerSetup, spec: Spec, console):
    from fedsoda_cli.federated.local import LocalWorkerPool

    return LocalWorkerPool(
        setup,
        spec.federate.workers,
        spec.federate.task_timeout_s,
        log=lambda line: console.print(f"[yellow]{escape(line)}[/]", highlight=False),
    )


def realigns(spec: Spec) -> bool:
    """Whether this run reaches a realignment round at all (one that another round follows)."""
    return 0 < spec.federate.realign_every < spec.federate.rounds


def realigner_for(ctx: StageContext, layer_map: LayerMap):
    """The server's realign step (full LLM + the align stage's float sub-LLM) if the run realigns."""
    if not realigns(ctx.spec):
        return None
    from fedsoda_cli.federated.realigner import ServerRealigner
    from fedsoda_cli.oda.realign import RealignConfig

    return ServerRealigner(
        RealignConfig.from_spec(ctx.spec),
        artifacts.stage_dir(ctx.workdir, "align") / "model",
        layer_map,
        log_path=ctx.out / "realign.jsonl",
    )


def write_outputs(
    ctx: StageContext, out: Path, store: CheckpointStore, result: RunResult, peft_config, wall_s: float
) -> dict[str, Any]:
    """adapter/, metrics.jsonl, summary.json, aggregator state, the last checkpoint; returns the summary."""
    write_peft_adapter(out / "adapter", result.adapter, peft_config)
    (out / "metrics.jsonl").write_text("".join(json.dumps(record.to_json(), sort_keys=True) + "\n" for record in result.history))
    write_state(out, "aggregator", result.aggregator_state, f"aggregator '{ctx.spec.federate.aggregator}' state_dict()")
    if result.realign_layers is not None:
        (out / "realigned_layers.safetensors").write_bytes(result.realign_layers)
    last = f"round-{ctx.spec.federate.rounds:04d}"
    shutil.copytree(store.folder / last, out / "checkpoints" / last)
    summary = summarize(ctx.spec, result, wall_s)
    artifacts.write_json_atomic(out / "summary.json", summary)
    return summary


def summarize(spec: Spec, result: RunResult, wall_s: float) -> dict[str, Any]:
    history = result.history
    ledger = result.ledger.state()
    final_eval = next((h.eval for h in reversed(history) if h.eval is not None), None)
    return {
        "rounds": len(history),
        "resumed_after": result.resumed_after,
        "aggregator": spec.federate.aggregator,
        "weighting": spec.federate.weighting,
        "eval_every": spec.federate.eval_every,
        "final_eval": None if final_eval is None else {target: entry.to_json() for target, entry in final_eval.items()},
        "final_train_loss": history[-1].train_loss if history else None,
        "bytes": {**ledger["totals"], "total": ledger["total"]},
        "bytes_per_client": ledger["per_client"],
        "excluded_updates": sum(len(h.excluded) for h in history),
        "failed_tasks": sum(len(h.failed) for h in history),
        "rounds_seconds": round(sum(h.seconds for h in history), 3),
        "wall_time_s": round(wall_s, 3),
        "model_loads_per_worker": {str(k): v for k, v in sorted(result.transport.get("model_loads", {}).items())},
        "worker_processes_started": result.transport.get("processes_started", 0),
        **(
            {"wire_bytes": result.transport["wire_bytes"]} if "wire_bytes" in result.transport else {}
        ),  # flower: bytes Flower shipped
    }


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    fmt = terminal.format_bytes
    bytes_ = summary["bytes"]
    loss = summary["final_train_loss"]
    return [
        ("rounds", f"{summary['rounds']}" + (f" (resumed after {summary['resumed_after']})" if summary["resumed_after"] else "")),
        ("final train loss", f"{loss:.4f}" if loss is not None else "-"),
        ("aggregation weights", summary["weighting"]),
        *(
            (f"validation accuracy ({target})", terminal.format_eval(EvalEntry.from_json(entry, f"final_eval.{target}")))
            for target, entry in (summary["final_eval"] or {}).items()
        ),
        ("model download (all clients)", fmt(bytes_["model"])),
        ("adapters down / up", f"{fmt(bytes_['adapter_down'])} / {fmt(bytes_['adapter_up'])}"),
        ("realigned layers", fmt(bytes_["realign"])),
        ("communication total", fmt(bytes_["total"])),
        ("excluded updates / failed tasks", f"{summary['excluded_updates']} / {summary['failed_tasks']}"),
        ("model loads per worker", ", ".join(f"{k}: {v}" for k, v in summary["model_loads_per_worker"].items()) or "-"),
        ("federated wall time", f"{summary['wall_time_s']:.1f} s"),
    ]
