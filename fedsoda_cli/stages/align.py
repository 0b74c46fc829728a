"""Stage 3, align (ODA pre-alignment): distil the sub-LLM's partial layers toward the full LLM.

In: `prune/model` (the sub-LLM, float32) and `prune/layer_map.json`; the full LLM of [model];
[quantize] (the client format the student is aligned in, `align.quant_aware`);
`public_data.sequences` windows of `public_data.split` to train on (with `align.text =
"task_prompts"`, cut from its sentences put into the task's prompt template: `[task]`'s name and
prompt, never its data), `public_data.heldout_sequences` windows of `public_data.heldout_split`
to measure before and after (never the training text; plain text whatever align.text says).
Out (in the stage folder):
  model/           the aligned sub-LLM, float32 safetensors (the server's master copy; its frozen
                   layers are the prune stage's float weights, quantize quantizes them)
  layer_map.json   prune's, plus "partial_layers" and "bf16_layers" (original indices of the
                   layers the client keeps in bf16: the partial layers for quant_aware =
                   "bf16_partial", else none), which quantize and the realigner read
  metrics.jsonl    one line per optimizer step: loss, kl, hidden_nmse per loss point, ce, seconds
Metrics: held-out KL, hidden NMSE per gap and perplexity of the pruned model in bf16, the aligned
model in bf16, the deployed (client-format, emulated) aligned model and the deployed unaligned
model (the control). A number that got worse is named in a warning row of the summary.
The loss and loop live in `oda/distill.py`, the client-format emulation in `models/fakequant.py`.
"""

from __future__ import annotations

import json

from fedsoda_cli.models.layer_map import LAYER_MAP, read_layer_map
from fedsoda_cli.stages.contract import StageContext, StageResult

MODEL_DIR = "model"
STEP_METRICS = "metrics.jsonl"


def run(ctx: StageContext) -> StageResult:
    """Align the pruned sub-LLM to the full LLM and save it with before/after measurements."""
    import torch

    from fedsoda_cli import seeding, terminal
    from fedsoda_cli.data.public import alignment_windows, public_windows
    from fedsoda_cli.models.load import load_causal_lm, load_checkpoint, save_checkpoint
    from fedsoda_cli.oda.distill import (
        align_partial_layers,
        check_trainable,
        measure,
        partial_layers,
        regressions,
        seeded_batches,
    )

    spec, config = ctx.spec, ctx.spec.align
    layer_map = read_layer_map(ctx.inputs["prune"] / LAYER_MAP)
    kept, groups = layer_map.kept, layer_map.removed_groups
    partial = partial_layers(config.partial, kept, groups)  # SpecError before any model is loaded
    check_trainable(config, kept, groups, partial)
    teacher, tokenizer = load_causal_lm(spec.model)
    student, _ = load_checkpoint(ctx.inputs["prune"] / MODEL_DIR, dtype=torch.float32)
    train_ids, heldout_ids = alignment_windows(spec, tokenizer), public_windows(spec, "held-out", tokenizer)

    with terminal.progress(ctx.console) as bar:
        task = bar.add_task("measure (before)", total=2 * len(heldout_ids), status="bf16 and deployed")
        before = measure(
            teacher, student, kept, groups, heldout_ids, config, spec.quantize, partial, advance=lambda k: bar.advance(task, k)
        )
        steps = bar.add_task("align", total=config.steps, status="")
        lines = (ctx.out / STEP_METRICS).open("w")

        def on_step(row):
            lines.write(json.dumps(row) + "\n")
            bar.update(steps, advance=1, status=f"loss {row['loss']:.4f}")

        batches = seeded_batches(train_ids, config.batch_size, seeding.stable_seed(spec.run.seed, "align"))
        with lines:
            history = align_partial_layers(
                teacher,
                student,
                kept,
                groups,
                config.partial,
                batches,
                config,
                config.steps,
                quant=spec.quantize,
                progress=on_step,
            )
        task = bar.add_task("measure (after)", total=2 * len(heldout_ids), status="bf16 and deployed")
        after = measure(
            teacher, student, kept, groups, heldout_ids, config, spec.quantize, partial, advance=lambda k: bar.advance(task, k)
        )

    save_checkpoint(student, tokenizer, ctx.out / MODEL_DIR)
    partial_original = [kept[k] for k in partial]
    layer_map.with_alignment(partial_original, partial_original if config.quant_aware == "bf16_partial" else []).write(
        ctx.out / LAYER_MAP
    )
    seconds = sum(row["seconds"] for row in history)
    measured = {
        "pruned_bf16": before["bf16"],
        "aligned_bf16": after["bf16"],
        "deployed_unaligned": before["deployed"],
        "deployed_aligned": after["deployed"],
    }
    warnings = regressions(
        [
            ("bf16", measured["pruned_bf16"], measured["aligned_bf16"]),
            ("deployed", measured["deployed_unaligned"], measured["deployed_aligned"]),
        ]
    )
    metrics = {
        "partial_layers": partial_original,
        "quant_aware": config.quant_aware,
        "hidden_at": config.hidden_at,
        "steps": len(history),
        "steps_per_s": round(len(history) / seconds, 3) if seconds else None,
        "measured": measured,
        "before": measured["pruned_bf16"],
        "after": measured["aligned_bf16"],
        "final_loss": history[-1]["loss"] if history else None,
        "warnings": warnings,
    }
    rows = summary_rows(measured, partial_original, len(history), config, warnings)
    return StageResult(metrics=metrics, summary=rows)


def summary_rows(measured: dict, partial_original: list[int], steps: int, config, warnings: list[str]) -> list[tuple[str, str]]:
    """The summary table: a warning first when a number got worse, then before -> after in bf16
    and as deployed (the unaligned deployed model is the control)."""
    rows = []
    if warnings:
        rows.append(("WARNING", "got worse: " + "; ".join(warnings) + " (the aligned model was written anyway)"))
    rows += [
        ("partial layers", ", ".join(map(str, partial_original))),
        ("steps", f"{steps} (quant_aware {config.quant_aware}, hidden at {config.hidden_at})"),
    ]
    pairs = [
        ("bf16", measured["pruned_bf16"], measured["aligned_bf16"]),
        ("deployed", measured["deployed_unaligned"], measured["deployed_aligned"]),
    ]
    for name, b, a in pairs:
        rows.append((f"KL (held-out, {name})", f"{b['kl']:.4f} -> {a['kl']:.4f}"))
    for name, b, a in pairs:
        for gap, value in b["hidden_nmse"].items():
            rows.append((f"hidden NMSE gap {gap} ({name})", f"{value:.4f} -> {a['hidden_nmse'][gap]:.4f}"))
    for name, b, a in pairs:
        rows.append((f"perplexity sub-LLM ({name})", f"{b['ppl_student']:.2f} -> {a['ppl_student']:.2f}"))
    rows.append(("perplexity full LLM", f"{measured['aligned_bf16']['ppl_teacher']:.2f}"))
    return rows
