"""Stage 3, align (ODA pre-alignment): distil the sub-LLM's partial layers toward the full LLM.

In: `prune/model` (the sub-LLM, float32) and `prune/layer_map.json`; the full LLM of [model];
`public_data.sequences` windows of `public_data.split` to train on, `public_data.heldout_sequences`
windows of `public_data.heldout_split` to measure before and after (never the training text).
Out (in the stage folder):
  model/           the aligned sub-LLM, float32 safetensors (the server's master copy)
  layer_map.json   copied from prune
  metrics.jsonl    one line per optimizer step: loss, kl, hidden_nmse per gap, ce, seconds
The loss and loop live in `distill.py`.
"""

from __future__ import annotations

import json
import shutil

from fedsoda_cli.errors import ArtifactError
from fedsoda_cli.pipeline import StageContext, StageResult

LAYER_MAP = "layer_map.json"
MODEL_DIR = "model"
STEP_METRICS = "metrics.jsonl"


def run(ctx: StageContext) -> StageResult:
    """Align the pruned sub-LLM to the full LLM and save it with before/after measurements."""
    import torch

    from fedsoda_cli import reporting, seeding
    from fedsoda_cli.models.load import load_causal_lm, load_checkpoint, save_checkpoint
    from fedsoda_cli.stages.distill import align_partial_layers, evaluate_alignment, partial_layers, seeded_batches

    spec, config = ctx.spec, ctx.spec.align
    layer_map = read_layer_map(ctx.inputs["prune"])
    kept, groups = layer_map["kept"], layer_map["removed_groups"]
    partial = partial_layers(config.partial, kept, groups)  # SpecError before any model is loaded
    teacher, tokenizer = load_causal_lm(spec.model)
    student, _ = load_checkpoint(ctx.inputs["prune"] / MODEL_DIR, dtype=torch.float32)
    train_ids, heldout_ids = public_text(spec, tokenizer)

    with reporting.progress(ctx.console) as bar:
        task = bar.add_task("measure (before)", total=len(heldout_ids), status="")
        before = evaluate_alignment(teacher, student, kept, groups, heldout_ids, config, advance=lambda k: bar.advance(task, k))
        steps = bar.add_task("align", total=config.steps, status="")
        lines = (ctx.out / STEP_METRICS).open("w")

        def on_step(row):
            lines.write(json.dumps(row) + "\n")
            bar.update(steps, advance=1, status=f"loss {row['loss']:.4f}")

        batches = seeded_batches(train_ids, config.batch_size, seeding.stable_seed(spec.run.seed, "align"))
        with lines:
            history = align_partial_layers(teacher, student, kept, groups, config.partial, batches, config, config.steps, progress=on_step)
        task = bar.add_task("measure (after)", total=len(heldout_ids), status="")
        after = evaluate_alignment(teacher, student, kept, groups, heldout_ids, config, advance=lambda k: bar.advance(task, k))

    save_checkpoint(student, tokenizer, ctx.out / MODEL_DIR)
    shutil.copyfile(ctx.inputs["prune"] / LAYER_MAP, ctx.out / LAYER_MAP)
    seconds = sum(row["seconds"] for row in history)
    metrics = {
        "partial_layers": [kept[k] for k in partial],
        "steps": len(history),
        "steps_per_s": round(len(history) / seconds, 3) if seconds else None,
        "before": before,
        "after": after,
        "final_loss": history[-1]["loss"] if history else None,
    }
    return StageResult(metrics=metrics, summary=summary_rows(before, after, [kept[k] for k in partial], len(history)))


def read_layer_map(folder) -> dict:
    """The layer map of a prune/align/quantize stage folder, checked for the keys we use."""
    path = folder / LAYER_MAP
    try:
        data = json.loads(path.read_text())
        kept, groups, n = data["kept"], data["removed_groups"], data["num_layers"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: missing or malformed layer map ({type(exc).__name__}); rerun `fedsoda prune SPEC --force`") from None
    if sorted(set(kept) | {l for g in groups for l in g}) != list(range(n)):
        raise ArtifactError(f"{path}: kept and removed_groups do not cover layers 0..{n - 1} exactly once; rerun `fedsoda prune SPEC --force`")
    return data


def public_text(spec, tokenizer):
    """(training windows from public_data.split, held-out windows from public_data.heldout_split)."""
    from fedsoda_cli.data.paths import resolve_data_dir
    from fedsoda_cli.data.public import public_sequences
    from fedsoda_cli.spec import spec_dir

    public = spec.public_data
    data_dir = resolve_data_dir(spec.data, spec_dir(spec))
    train = public_sequences(data_dir, public.split, tokenizer, public.sequences, public.seq_len)
    heldout = public_sequences(data_dir, public.heldout_split, tokenizer, public.heldout_sequences, public.seq_len)
    return train, heldout


def summary_rows(before: dict, after: dict, partial_original: list[int], steps: int) -> list[tuple[str, str]]:
    rows = [
        ("partial layers", ", ".join(map(str, partial_original))),
        ("steps", str(steps)),
        ("KL (held-out)", f"{before['kl']:.4f} -> {after['kl']:.4f}"),
    ]
    for gap, value in before["hidden_nmse"].items():
        rows.append((f"hidden NMSE gap {gap}", f"{value:.4f} -> {after['hidden_nmse'][gap]:.4f}"))
    rows.append(("perplexity sub-LLM", f"{before['ppl_student']:.2f} -> {after['ppl_student']:.2f} (full LLM {after['ppl_teacher']:.2f})"))
    return rows
