"""Stage 6, realign (ODA intermittent realignment): the align step again, with the current global
LoRA adapter attached to both models; only the partial layers' base weights change, and those
layers alone are re-quantized and broadcast to the clients.

Library use (the federated runtime, every r rounds):
    result = realign(teacher_full, student_sub, adapter_state_sub, kept, removed_groups, batches,
                     config=spec.align, lora=lora_spec, steps=spec.realign.steps)
    nbytes = write_partial_layers(result.partial_layer_state, spec.quantize, path)  # communication
    apply_partial_layers(client_model, path)                                        # on each client
`student_sub` is the server's float master copy; its partial layers are updated in place.

Standalone (`fedsoda realign SPEC --adapter DIR`): `run_standalone` starts from the align stage's
float sub-LLM and the quantize stage's client model (it does not chain on an earlier standalone
realign) and writes `<workdir>/realign/`:
  model/                           the new client model (the old one in quantize/ is untouched)
  partial_layers.safetensors       the realigned layers, client format: what is broadcast
  partial_layers.float.safetensors the same layers in float32 (the master copy's update)
  layer_map.json, metrics.jsonl
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from fedsoda_cli.spec.schema import AlignSpec, LoraSpec, QuantizeSpec

PARTIAL_LAYERS = "partial_layers.safetensors"
PARTIAL_LAYERS_FLOAT = "partial_layers.float.safetensors"
MODEL_DIR = "model"
LAYER_MAP = "layer_map.json"
STEP_METRICS = "metrics.jsonl"
SECTIONS = ("model", "data", "public_data", "align", "realign", "quantize", "run.seed")


@dataclass
class RealignResult:
    """The new float base weights of the partial layers, keyed as in the sub-LLM's state dict
    (e.g. "model.layers.7.mlp.up_proj.weight"), and the run's metrics."""

    partial_layer_state: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)


def realign(teacher_full, student_sub, adapter_state_sub: dict[str, torch.Tensor], kept: list[int],
            removed_groups: list[list[int]], batches: Iterable[dict[str, torch.Tensor]], *, config: AlignSpec,
            lora: LoraSpec, steps: int, heldout_ids: torch.Tensor | None = None, quant: QuantizeSpec | None = None,
            progress: Callable[[dict[str, Any]], None] | None = None) -> RealignResult:
    """Attach the global adapter to the student and, mapped through `kept`, to the teacher (as
    frozen LoRA modules, not merged), train the partial layers' base weights with the ODA loss for
    `steps` steps, detach the adapters again and return the partial layers' new weights. Both
    models come back without LoRA; the student's partial layers are updated in place. With `quant`
    the student trains as the client model of that format (`align.quant_aware`, as in align). With
    `heldout_ids`, KL/NMSE/perplexity (adapter attached) are measured before and after, in bf16 and
    as deployed: metrics "before"/"after" (bf16), "measured" (the four variants), "warnings"."""
    from fedsoda_cli.models.adapters import attach_lora, load_adapter_state, sub_to_full_adapter
    from fedsoda_cli.models.layers import decoder_layers_path
    from fedsoda_cli.stages.distill import align_partial_layers, measure, partial_layers

    partial = partial_layers(config.partial, kept, removed_groups)
    layers_path = decoder_layers_path(student_sub)
    student = attach_lora(student_sub, lora)
    try:
        teacher = attach_lora(teacher_full, lora, layers=kept)
        try:
            load_adapter_state(student, adapter_state_sub)
            load_adapter_state(teacher, sub_to_full_adapter(adapter_state_sub, kept, layers_path=decoder_layers_path(teacher_full)))
            def measured():
                if heldout_ids is None:
                    return None
                return measure(teacher, student, kept, removed_groups, heldout_ids, config, quant, partial)

            before = measured()
            history = align_partial_layers(teacher, student, kept, removed_groups, config.partial, batches, config, steps,
                                           quant=quant, progress=progress)
            after = measured()
        finally:
            teacher.unload()
    finally:
        student.unload()
    state = partial_layer_state(student_sub, partial, layers_path)
    metrics = {"steps": len(history), "partial_layers": [kept[k] for k in partial], "history": history}
    if heldout_ids is not None:
        from fedsoda_cli.stages.align import regressions

        variants = {"before_bf16": before["bf16"], "after_bf16": after["bf16"],
                    "deployed_before": before["deployed"], "deployed_after": after["deployed"]}
        metrics.update(before=before["bf16"], after=after["bf16"], measured=variants,
                       warnings=regressions([("bf16", before["bf16"], after["bf16"]),
                                             ("deployed", before["deployed"], after["deployed"])]))
    return RealignResult(state, metrics)


def broadcast_format(align: AlignSpec, quant: QuantizeSpec) -> QuantizeSpec:
    """The format the partial layers travel and live in on the client: `quant`, or bf16 when the
    client keeps them in bf16 (quant_aware = "bf16_partial")."""
    return quant.model_copy(update={"quant_type": "none"}) if align.quant_aware == "bf16_partial" else quant


def partial_layer_state(model, partial: list[int], layers_path: str) -> dict[str, torch.Tensor]:
    """Float copies of every parameter of the decoder layers `partial` (sub-LLM indices)."""
    layers = model.get_submodule(layers_path)
    return {f"{layers_path}.{k}.{name}": p.detach().clone() for k in partial for name, p in layers[k].named_parameters()}


def partial_layer_artifact(partial_layer_state: dict[str, torch.Tensor], quant: QuantizeSpec) -> dict[str, torch.Tensor]:
    """The partial layers as the client model stores them: linear weights (2-D `.weight` inside a
    decoder layer) quantized to `quant.quant_type` exactly as the quantize stage does, everything
    else (norms, biases) bf16."""
    from fedsoda_cli.models.quantized import quantize_linear_weight

    out: dict[str, torch.Tensor] = {}
    for key, tensor in partial_layer_state.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and tensor.ndim == 2:
            for rel, value in quantize_linear_weight(tensor, quant.quant_type, quant.double_quant).items():
                out[f"{module}.{rel}"] = value
        else:
            out[key] = tensor.detach().to(torch.bfloat16).contiguous()
    return out


def write_partial_layers(partial_layer_state: dict[str, torch.Tensor], quant: QuantizeSpec, path: str | os.PathLike) -> int:
    """Re-quantize the partial layers and write them alone to `path` (safetensors); returns its
    size in bytes, which is what broadcasting them to one client costs."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(partial_layer_artifact(partial_layer_state, quant), path, metadata={"format": "pt", "quant_type": quant.quant_type})
    return path.stat().st_size


def apply_partial_layers(client_model, artifact: str | os.PathLike | dict[str, torch.Tensor]) -> list[str]:
    """Swap the realigned layers of `artifact` (a file from `write_partial_layers`, or its
    tensors) into a client model in place (a LoRA-wrapped one too: adapters are kept). Returns the
    module paths replaced."""
    from safetensors.torch import load_file

    from fedsoda_cli.models.quantized import set_module_tensors

    tensors = artifact if isinstance(artifact, dict) else load_file(str(artifact))
    return set_module_tensors(client_model, tensors)


# ---- standalone stage ---------------------------------------------------------------------------


def run_standalone(spec, workdir: Path, adapter_dir: str | os.PathLike, console):
    """`fedsoda realign SPEC --adapter DIR`: realign the align stage's float sub-LLM with the adapter
    in `adapter_dir` (a PEFT folder of the sub-LLM, e.g. <workdir>/federate/adapter), write the new
    client model and the broadcast artifact into `<workdir>/realign/` atomically. Returns the
    stage manifest (its summary is printed)."""
    from safetensors.torch import save_file

    from fedsoda_cli import artifacts, reporting, seeding
    from fedsoda_cli.models.adapters import read_adapter_dir
    from fedsoda_cli.models.load import load_causal_lm, load_checkpoint
    from fedsoda_cli.models.quantized import folder_bytes, load_client_model, save_client_model
    from fedsoda_cli.pipeline import Stage, input_folders
    from fedsoda_cli.spec import sections_hash
    from fedsoda_cli.stages.align import public_text, read_layer_map
    from fedsoda_cli.stages.distill import seeded_batches

    stage = Stage("realign", ("align", "quantize"), SECTIONS, "fedsoda_cli.stages.realign:run_standalone")
    inputs, digests = input_folders(spec, workdir, stage)
    adapter_state, lora = read_adapter_dir(adapter_dir)
    layer_map = read_layer_map(inputs["quantize"])
    kept, groups = layer_map["kept"], layer_map["removed_groups"]
    seeding.prepare(spec)

    teacher, tokenizer = load_causal_lm(spec.model)
    student, _ = load_checkpoint(inputs["align"] / MODEL_DIR, dtype=torch.float32)
    train_ids, heldout_ids = public_text(spec, tokenizer)
    batches = seeded_batches(train_ids, spec.align.batch_size, seeding.stable_seed(spec.run.seed, "realign"))
    with artifacts.write_stage(workdir, "realign", sections_hash(spec, SECTIONS), digests) as writer:
        out = writer.path
        with reporting.progress(console) as bar, (out / STEP_METRICS).open("w") as lines:
            task = bar.add_task("realign", total=spec.realign.steps, status="")

            def on_step(row):
                lines.write(json.dumps(row) + "\n")
                bar.update(task, advance=1, status=f"loss {row['loss']:.4f}")

            result = realign(teacher, student, adapter_state, kept, groups, batches, config=spec.align, lora=lora,
                             steps=spec.realign.steps, heldout_ids=heldout_ids, quant=spec.quantize, progress=on_step)
        artifact_bytes = write_partial_layers(result.partial_layer_state, broadcast_format(spec.align, spec.quantize), out / PARTIAL_LAYERS)
        save_file({k: v.contiguous() for k, v in result.partial_layer_state.items()}, out / PARTIAL_LAYERS_FLOAT, metadata={"format": "pt"})
        client, client_tokenizer = load_client_model(inputs["quantize"] / MODEL_DIR, prepare_for_training=False)
        apply_partial_layers(client, out / PARTIAL_LAYERS)
        save_client_model(client, client_tokenizer, out / MODEL_DIR)
        shutil.copyfile(inputs["quantize"] / LAYER_MAP, out / LAYER_MAP)
        before, after = result.metrics["before"], result.metrics["after"]
        writer.manifest.metrics = {
            "adapter": str(adapter_dir),
            "steps": result.metrics["steps"],
            "partial_layers": result.metrics["partial_layers"],
            "partial_layers_bytes": artifact_bytes,
            "client_model_bytes": folder_bytes(out / MODEL_DIR),
            "before": before,
            "after": after,
            "measured": result.metrics["measured"],
            "warnings": result.metrics["warnings"],
        }
    manifest = artifacts.read_manifest(workdir, "realign")
    measured = result.metrics["measured"]
    rows = [("WARNING", "got worse: " + "; ".join(result.metrics["warnings"]) + " (the realigned model was written anyway)")] if result.metrics["warnings"] else []
    rows += [
        ("adapter", str(adapter_dir)),
        ("partial layers", ", ".join(map(str, result.metrics["partial_layers"]))),
        ("steps", str(result.metrics["steps"])),
        ("KL (held-out, adapter on)", f"bf16 {before['kl']:.4f} -> {after['kl']:.4f}, deployed "
                                      f"{measured['deployed_before']['kl']:.4f} -> {measured['deployed_after']['kl']:.4f}"),
        *[(f"hidden NMSE gap {gap} (deployed)", f"{value:.4f} -> {measured['deployed_after']['hidden_nmse'][gap]:.4f}")
          for gap, value in measured["deployed_before"]["hidden_nmse"].items()],
        ("perplexity (deployed, adapter on)", f"{measured['deployed_before']['ppl_student']:.2f} -> {measured['deployed_after']['ppl_student']:.2f}"),
        ("broadcast per client", reporting.format_bytes(artifact_bytes)),
        ("new client model", str(workdir / "realign" / MODEL_DIR)),
    ]
    reporting.stage_summary(console, "realign", rows, manifest)
    return manifest
