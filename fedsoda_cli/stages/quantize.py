"""Stage 4, quantize (QLoRA base): the client's copy of the aligned sub-LLM.

In: `align/model` (float32 sub-LLM) and `align/layer_map.json` (fedpetuning: `base/`, the full model); [quantize]; held-out public text
(`public_data.heldout_split`, `heldout_sequences`) for perplexity.
Out (in the stage folder):
  model/           the client model: decoder-layer linears in `quantize.quant_type` (NF4 with double
                   quantization by default), embeddings/norms/lm_head bf16 (or int8 embeddings);
                   load it with `fedsoda_cli.models.quantized.load_client_model`
  layer_map.json   copied from align
Layers listed in the layer map's "bf16_layers" (align.quant_aware = "bf16_partial") stay bf16.
Metrics: bytes on disk of the client model (all files in model/, and weights alone), the full LLM
and the unquantized sub-LLM in bf16 (parameter count x 2 bytes, computed, not saved), the saving,
the held-out perplexity of the quantized sub-LLM beside the bf16 sub-LLM, and the held-out KL,
hidden NMSE per gap and perplexity against the full LLM of the bf16 sub-LLM and of the real client
model (bitsandbytes, as saved), beside align's deployed-unaligned control: a deployed model that is
no better than the control gets a warning row.
"""

from __future__ import annotations

import shutil

from fedsoda_cli.models.layer_map import LAYER_MAP, read_layer_map
from fedsoda_cli.stages.contract import StageContext, StageResult

MODEL_DIR = "model"
BF16_BYTES = 2
PPL_BATCH = 4  # windows per forward pass when measuring perplexity


def run(ctx: StageContext) -> StageResult:
    """Quantize the aligned sub-LLM, save the client model and report its size and perplexity."""
    import torch

    from fedsoda_cli import terminal
    from fedsoda_cli.models import quantized
    from fedsoda_cli.models.load import load_causal_lm, load_checkpoint
    from fedsoda_cli.oda.distill import evaluate_alignment

    spec, quant = ctx.spec, ctx.spec.quantize
    (upstream,) = ctx.inputs.values()  # align for fedsoda and fedot; the full model for fedpetuning
    source = upstream / MODEL_DIR
    layer_map = read_layer_map(upstream / LAYER_MAP)
    float_model, tokenizer = load_checkpoint(source, dtype=torch.float32)
    params_sub, params_full = parameter_counts(float_model, layer_map.num_layers)

    kept, groups = layer_map.kept, layer_map.removed_groups
    bf16_original = layer_map.bf16_layers or []  # prune's map (fedpetuning's base) has none
    bf16_layers = [kept.index(layer) for layer in bf16_original]
    client = quantized.quantize_checkpoint(source, quant, bf16_layers=bf16_layers)
    quantized.save_client_model(client, tokenizer, ctx.out / MODEL_DIR)
    shutil.copyfile(upstream / LAYER_MAP, ctx.out / LAYER_MAP)

    heldout = heldout_text(spec, tokenizer)
    round_to_bf16(float_model)
    teacher, _ = load_causal_lm(spec.model)
    with terminal.progress(ctx.console) as bar:
        task = bar.add_task("perplexity", total=2 * len(heldout), status="bf16 and quantized sub-LLM vs the full LLM")
        bf16 = evaluate_alignment(
            teacher, float_model, kept, groups, heldout, spec.align, batch_size=PPL_BATCH, advance=lambda k: bar.advance(task, k)
        )
        deployed = evaluate_alignment(
            teacher, client, kept, groups, heldout, spec.align, batch_size=PPL_BATCH, advance=lambda k: bar.advance(task, k)
        )
    del teacher
    control = upstream_measurement(upstream, "deployed_unaligned")
    warnings = []
    if control is not None:
        from fedsoda_cli.oda.distill import regressions

        warnings = regressions([("deployed vs unaligned control", control, deployed)])

    client_bytes = quantized.folder_bytes(ctx.out / MODEL_DIR)
    weight_bytes = quantized.weight_file_bytes(ctx.out / MODEL_DIR)
    full_bf16, sub_bf16 = params_full * BF16_BYTES, params_sub * BF16_BYTES
    metrics = {
        "quant_type": quant.quant_type,
        "double_quant": quant.double_quant,
        "embeddings": quant.embeddings,
        "client_model_bytes": client_bytes,
        "client_weight_bytes": weight_bytes,
        "full_model_bf16_bytes": full_bf16,
        "sub_model_bf16_bytes": sub_bf16,
        "bf16_bytes_method": "parameter count x 2 (computed)",
        "params_full": params_full,
        "params_sub": params_sub,
        "saving_vs_full_pct": round(100 * (1 - client_bytes / full_bf16), 2),
        "saving_weights_vs_full_pct": round(100 * (1 - weight_bytes / full_bf16), 2),
        "heldout_ppl_sub_bf16": bf16["ppl_student"],
        "heldout_ppl_sub_quantized": deployed["ppl_student"],
        "heldout_tokens": deployed["tokens"],
        "bf16_layers": bf16_original,
        "measured": {"aligned_bf16": bf16, "deployed_aligned": deployed, "deployed_unaligned": control},
        "warnings": warnings,
    }
    budget = layer_map.storage_budget
    if budget is not None:  # prune.storage_budget: the prediction prune chose by, against what was written
        metrics["storage_budget"] = {
            **budget,
            "actual_client_bytes": client_bytes,
            "within_budget": client_bytes <= budget["budget_bytes"],
            "predicted_over_actual": round(budget["predicted_client_bytes"] / client_bytes, 4),
        }
        if client_bytes > budget["budget_bytes"]:  # the prediction is an upper bound: this means it is wrong
            metrics["warnings"] = warnings + [
                f"the client model weighs {client_bytes:,} B, over prune.storage_budget's {budget['budget_bytes']:,} B"
            ]
    fmt = terminal.format_bytes
    summary = [
        (
            "format",
            f"{quant.quant_type}{' + double quant' if quant.double_quant and quant.quant_type in ('nf4', 'fp4') else ''}, embeddings {quant.embeddings}",
        ),
        ("client model on disk", f"{fmt(client_bytes)} (weights {fmt(weight_bytes)})"),
        ("full LLM bf16 (computed)", fmt(full_bf16)),
        ("sub-LLM bf16 (computed)", fmt(sub_bf16)),
        (
            "storage saving vs full",
            f"{metrics['saving_vs_full_pct']:.1f} % (weights only {metrics['saving_weights_vs_full_pct']:.1f} %)",
        ),
        ("held-out perplexity", f"bf16 sub-LLM {bf16['ppl_student']:.2f}, quantized {deployed['ppl_student']:.2f}"),
        (
            "held-out KL to the full LLM",
            f"bf16 sub-LLM {bf16['kl']:.4f}, quantized {deployed['kl']:.4f}"
            + (f" (unaligned control {control['kl']:.4f})" if control else ""),
        ),
    ]
    for gap, value in deployed["hidden_nmse"].items():
        summary.append(
            (
                f"hidden NMSE gap {gap}",
                f"bf16 {bf16['hidden_nmse'][gap]:.4f}, quantized {value:.4f}"
                + (f" (control {control['hidden_nmse'][gap]:.4f})" if control and gap in control["hidden_nmse"] else ""),
            )
        )
    if budget is not None:
        summary.append(
            (
                "storage budget",
                f"{client_bytes:,} B of {budget['budget_bytes']:,} B (predicted {budget['predicted_client_bytes']:,} B)",
            )
        )
    if bf16_layers:
        summary.append(("kept in bf16", "layers " + ", ".join(map(str, bf16_original)) + " (align.quant_aware = bf16_partial)"))
    if warnings:
        summary.insert(0, ("WARNING", "the client model is not better than the unaligned control: " + "; ".join(warnings)))
    if budget is not None and not metrics["storage_budget"]["within_budget"]:
        summary.insert(0, ("WARNING", metrics["warnings"][-1]))
    return StageResult(metrics=metrics, summary=summary)


def upstream_measurement(upstream, name: str) -> dict | None:
    """align's recorded measurement `name` (e.g. the deployed unaligned control), if any."""
    import json

    try:
        return json.loads((upstream / "manifest.json").read_text())["metrics"]["measured"][name]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def parameter_counts(sub_model, num_layers: int) -> tuple[int, int]:
    """(sub-LLM parameters, full-LLM parameters), tied weights once. The full count is the
    sub-LLM's non-layer parameters plus `num_layers` times one decoder layer's, which is exact for
    the uniform layer stacks of decoder-only LLMs and needs no second model in memory."""
    from fedsoda_cli.models.layers import decoder_layers

    layers = decoder_layers(sub_model)
    total = sum(p.numel() for p in sub_model.parameters())
    per_layer = sum(p.numel() for p in layers[0].parameters())
    in_layers = sum(p.numel() for p in layers.parameters())
    return total, total - in_layers + num_layers * per_layer


def round_to_bf16(model) -> None:
    """Round every weight to bf16 in place (kept in float32 for compute): the bf16 sub-LLM."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16).to(p.dtype)


def heldout_text(spec, tokenizer):
    from fedsoda_cli.data.public import public_windows

    return public_windows(spec, "held-out", tokenizer)
