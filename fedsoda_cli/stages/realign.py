"""The realign stage, on demand (`fedsoda realign SPEC --adapter DIR`): ODA's intermittent
realignment, run once on the server with a given global adapter. It is in no method's stage list:
the federate stage (stage 5) runs the same step every `federate.realign_every` rounds itself. The
step is the library `fedsoda_cli/oda/realign.py`.

In: `align/model` (the float sub-LLM: realign starts from it, never from an earlier realign),
`quantize/` (the client model and layer_map.json), the adapter folder (option "adapter", a PEFT
folder of the sub-LLM, e.g. <workdir>/federate/adapter). Out (the stage folder `realign/`):
  model/                           the new client model (the old one in quantize/ is untouched)
  partial_layers.safetensors       the realigned layers, client format: what is broadcast
  partial_layers.float.safetensors the same layers in float32 (the master copy's update)
  layer_map.json, metrics.jsonl
"""

from __future__ import annotations

import json
import shutil

from fedsoda_cli.models.layer_map import LAYER_MAP, read_layer_map
from fedsoda_cli.stages.contract import StageContext, StageResult

MODEL_DIR = "model"
STEP_METRICS = "metrics.jsonl"
PARTIAL_LAYERS_FLOAT = "partial_layers.float.safetensors"


def run(ctx: StageContext) -> StageResult:
    import torch
    from safetensors.torch import save_file

    from fedsoda_cli import seeding, terminal
    from fedsoda_cli.data.public import alignment_windows, public_windows
    from fedsoda_cli.models.adapters import read_adapter_dir
    from fedsoda_cli.models.load import load_causal_lm, load_checkpoint
    from fedsoda_cli.models.quantized import folder_bytes, load_client_model, save_client_model
    from fedsoda_cli.oda.distill import seeded_batches
    from fedsoda_cli.oda.realign import PARTIAL_LAYERS, apply_partial_layers, broadcast_format, realign, write_partial_layers

    spec, out, adapter_dir = ctx.spec, ctx.out, ctx.options["adapter"]
    adapter_state, lora = read_adapter_dir(adapter_dir)
    layer_map = read_layer_map(ctx.inputs["quantize"] / LAYER_MAP)

    teacher, tokenizer = load_causal_lm(spec.model)
    student, _ = load_checkpoint(ctx.inputs["align"] / MODEL_DIR, dtype=torch.float32)
    train_ids, heldout_ids = alignment_windows(spec, tokenizer), public_windows(spec, "held-out", tokenizer)
    batches = seeded_batches(train_ids, spec.align.batch_size, seeding.stable_seed(spec.run.seed, "realign"))
    with terminal.progress(ctx.console) as bar, (out / STEP_METRICS).open("w") as lines:
        task = bar.add_task("realign", total=spec.realign.steps, status="")

        def on_step(row):
            lines.write(json.dumps(row) + "\n")
            bar.update(task, advance=1, status=f"loss {row['loss']:.4f}")

        result = realign(
            teacher,
            student,
            adapter_state,
            layer_map.kept,
            layer_map.removed_groups,
            batches,
            config=spec.align,
            lora=lora,
            steps=spec.realign.steps,
            heldout_ids=heldout_ids,
            quant=spec.quantize,
            progress=on_step,
        )
    artifact_bytes = write_partial_layers(
        result.partial_layer_state, broadcast_format(spec.align, spec.quantize), out / PARTIAL_LAYERS
    )
    save_file(
        {k: v.contiguous() for k, v in result.partial_layer_state.items()}, out / PARTIAL_LAYERS_FLOAT, metadata={"format": "pt"}
    )
    client, client_tokenizer = load_client_model(ctx.inputs["quantize"] / MODEL_DIR, prepare_for_training=False)
    apply_partial_layers(client, out / PARTIAL_LAYERS)
    save_client_model(client, client_tokenizer, out / MODEL_DIR)
    shutil.copyfile(ctx.inputs["quantize"] / LAYER_MAP, out / LAYER_MAP)
    before, after, measured = result.metrics["before"], result.metrics["after"], result.metrics["measured"]
    metrics = {
        "adapter": str(adapter_dir),
        "steps": result.metrics["steps"],
        "partial_layers": result.metrics["partial_layers"],
        "partial_layers_bytes": artifact_bytes,
        "client_model_bytes": folder_bytes(out / MODEL_DIR),
        "before": before,
        "after": after,
        "measured": measured,
        "warnings": result.metrics["warnings"],
    }
    rows = (
        [("WARNING", "got worse: " + "; ".join(result.metrics["warnings"]) + " (the realigned model was written anyway)")]
        if result.metrics["warnings"]
        else []
    )
    rows += [
        ("adapter", str(adapter_dir)),
        ("partial layers", ", ".join(map(str, result.metrics["partial_layers"]))),
        ("steps", str(result.metrics["steps"])),
        (
            "KL (held-out, adapter on)",
            f"bf16 {before['kl']:.4f} -> {after['kl']:.4f}, deployed "
            f"{measured['deployed_before']['kl']:.4f} -> {measured['deployed_after']['kl']:.4f}",
        ),
        *[
            (f"hidden NMSE gap {gap} (deployed)", f"{value:.4f} -> {measured['deployed_after']['hidden_nmse'][gap]:.4f}")
            for gap, value in measured["deployed_before"]["hidden_nmse"].items()
        ],
        (
            "perplexity (deployed, adapter on)",
            f"{measured['deployed_before']['ppl_student']:.2f} -> {measured['deployed_after']['ppl_student']:.2f}",
        ),
        ("broadcast per client", terminal.format_bytes(artifact_bytes)),
        ("new client model", str(ctx.workdir / "realign" / MODEL_DIR)),
    ]
    return StageResult(metrics=metrics, summary=rows)
