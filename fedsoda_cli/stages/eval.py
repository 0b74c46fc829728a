"""Stage 6, eval: the task metric and held-out perplexity of the plugin, sub and zero-shot targets.

In: `federate/adapter/` (the final global adapter of the sub-LLM), `quantize/model/` (the client
sub-LLM) and `quantize/layer_map.json` (kept layers), the spec's full model, the task's eval
split (`task.eval_examples` limits it), `public_data.heldout_sequences` held-out windows and, for
`eval.plugin_scale = "val"`, the task's validation slice.
Out (in the stage folder):
  plugin_adapter/    the global adapter mapped onto the full model: a stock PEFT adapter folder,
                     its update scaled by the plug-in scale (eval.plugin_scale), which
                     plugin_scale.json beside the weights records
  results.json       {target: {task, metric, accuracy, correct, count, ci95: [lo, hi],
                               perplexity, perplexity_nll, perplexity_tokens, seconds (plugin:
                               choosing its scale included),
                               vs_zero_shot, plugin_scale}}: `plugin_scale` (plugin only) is
                     {scale, chosen_on: "spec" | "val", candidates: [{scale, accuracy, correct,
                     count, loss}] on the validation slice}; `vs_zero_shot` (when zero-shot is a target too) is
                     the paired difference on the same examples (evaluation.stats.paired_difference:
                     count, both, only_a, only_b, difference, ci95, p_mcnemar)
  predictions.jsonl  one line per target x example: target, id, prediction, gold, correct, and the
                     label-word log-likelihoods (`scores`) or the generated text (`output`)
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from fedsoda_cli.models.layer_map import LAYER_MAP
from fedsoda_cli.stages.contract import StageContext, StageResult

RESULTS = "results.json"
PREDICTIONS = "predictions.jsonl"
PLUGIN_ADAPTER = "plugin_adapter"
PLUGIN_SCALE = "plugin_scale.json"  # inside plugin_adapter/: {scale, chosen_on, candidates}


def run(ctx: StageContext) -> StageResult:
    """Evaluate every target of `eval.targets` and write results.json and predictions.jsonl."""
    from fedsoda_cli import artifacts, terminal
    from fedsoda_cli.data.paths import resolve_data_dir
    from fedsoda_cli.data.tasks import load_task
    from fedsoda_cli.spec import spec_dir

    spec = ctx.spec
    folders = run_folders(ctx)
    examples = load_task(spec.task, resolve_data_dir(spec.data, spec_dir(spec)), "eval", spec.run.seed, spec_dir=spec_dir(spec))
    results: dict[str, dict] = {}
    outcomes: dict[str, list[bool]] = {}
    with open(ctx.out / PREDICTIONS, "w") as lines, terminal.progress(ctx.console) as bar:
        for target in spec.eval.targets:
            started = time.perf_counter()
            model, tokenizer = build_target(target, spec, folders, ctx.out / PLUGIN_ADAPTER, bar)
            results[target], outcomes[target] = evaluate_target(target, model, tokenizer, examples, spec, bar, lines)
            if target == "plugin":
                results[target]["plugin_scale"] = read_plugin_scale(ctx.out / PLUGIN_ADAPTER)
            results[target]["seconds"] = round(time.perf_counter() - started, 2)
            del model
            gc.collect()  # one target's model at a time in memory
    add_paired_differences(results, outcomes)
    artifacts.write_json_atomic(ctx.out / RESULTS, results)
    return StageResult(metrics=_metrics(results), summary=_summary(results))


def run_folders(ctx: StageContext) -> dict[str, Path]:
    """federate's adapter, and quantize's client model and layer map (quantize is checked intact)."""
    quantize = ctx.inputs["quantize"]
    return {
        "adapter": ctx.inputs["federate"] / "adapter",
        "client_model": quantize / "model",
        "realigned_layers": ctx.inputs["federate"] / "realigned_layers.safetensors",
        "layer_map": quantize / LAYER_MAP,
    }


def build_target(target: str, spec, folders: dict[str, Path], plugin_dir: Path, bar=None):
    """(model, tokenizer) of one target; the plugin adapter folder is written on first use, at the
    plug-in scale `eval.plugin_scale` gives (chosen on the validation slice for "val", shown on `bar`)."""
    from fedsoda_cli.evaluation import plugin_scale, targets
    from fedsoda_cli.models.layers import decoder_layers_path

    if target == "sub":
        return targets.load_sub(folders["client_model"], folders["adapter"], folders["realigned_layers"])
    model, tokenizer = targets.load_full(spec)
    if target == "zero-shot":
        return model, tokenizer
    layer_map = targets.layer_map_for(spec, folders["layer_map"], model)
    targets.check_layer_map(model, layer_map, folders["layer_map"])
    if not plugin_dir.exists():
        choice = plugin_scale.choose(spec, model, tokenizer, folders["adapter"], layer_map, bar)
        targets.write_plugin_adapter(folders["adapter"], layer_map, decoder_layers_path(model), plugin_dir, scale=choice.scale)
        (plugin_dir / PLUGIN_SCALE).write_text(json.dumps(choice.to_json(), indent=2, sort_keys=True))
    return targets.with_adapter(model, plugin_dir), tokenizer


def read_plugin_scale(plugin_dir: Path) -> dict | None:
    """The plug-in scale a plugin adapter folder was written with and how it was chosen (None for a
    folder written before the scale existed: s = 1)."""
    path = plugin_dir / PLUGIN_SCALE
    return json.loads(path.read_text()) if path.is_file() else None


def add_paired_differences(results: dict[str, dict], outcomes: dict[str, list[bool]]) -> None:
    """Each trained target against zero-shot on the same examples (`vs_zero_shot`): the question
    a reader asks of a fine-tuning run, answered by the paired test, not by two intervals' overlap."""
    from fedsoda_cli.evaluation.stats import paired_difference

    if "zero-shot" not in outcomes:
        return
    for target in results:
        if target != "zero-shot":
            results[target]["vs_zero_shot"] = paired_difference(outcomes[target], outcomes["zero-shot"]).to_json()


def evaluate_target(target: str, model, tokenizer, examples, spec, bar, lines) -> tuple[dict, list[bool]]:
    """The results.json entry of one target and whether each example was answered right (in the
    order of `examples`); its predictions are appended to `lines`."""
    from fedsoda_cli.evaluation.task import evaluate_for_spec

    task = bar.add_task(f"eval {target}", total=len(examples), status=spec.task.name)
    score = evaluate_for_spec(spec, model, tokenizer, examples, advance=lambda k: bar.advance(task, k))
    for prediction in score.predictions:
        lines.write(json.dumps(prediction.record(target)) + "\n")
    entry = score.summary()
    if spec.eval.perplexity:
        entry.update(_perplexity(target, model, tokenizer, spec, bar))
    return entry, [prediction.correct for prediction in score.predictions]


def _perplexity(target: str, model, tokenizer, spec, bar) -> dict:
    from fedsoda_cli.data.public import public_windows
    from fedsoda_cli.evaluation.perplexity import perplexity

    public = spec.public_data
    windows = public_windows(spec, "held-out", tokenizer)
    task = bar.add_task(f"perplexity {target}", total=len(windows), status=f"wikitext2 {public.heldout_split}")
    result = perplexity(model, windows, batch_size=spec.eval.batch_size, advance=lambda k: bar.advance(task, k))
    return {"perplexity": result.perplexity, "perplexity_nll": result.nll, "perplexity_tokens": result.tokens}


def _metrics(results: dict[str, dict]) -> dict:
    """Manifest metrics: task, count, and accuracy / perplexity by target."""
    first = next(iter(results.values()), {})
    return {
        "task": first.get("task"),
        "metric": first.get("metric"),
        "count": first.get("count"),
        "accuracy": {t: r["accuracy"] for t, r in results.items()},
        "perplexity": {t: r["perplexity"] for t, r in results.items() if "perplexity" in r},
    }


def _summary(results: dict[str, dict]) -> list[tuple[str, str]]:
    """Terminal rows: accuracy with its 95 % interval, and perplexity, per target."""
    rows: list[tuple[str, str]] = []
    first = next(iter(results.values()), None)
    if first:
        rows.append(("task", f"{first['task']}, {first['count']} examples, {first['metric']}"))
    for target, r in results.items():
        lo, hi = r["ci95"]
        rows.append(
            (
                f"{target} accuracy",
                f"{100 * r['accuracy']:.1f} %  (95 % CI {100 * lo:.1f}-{100 * hi:.1f}, {r['correct']}/{r['count']})",
            )
        )
        if "vs_zero_shot" in r:
            paired = r["vs_zero_shot"]
            lo, hi = paired["ci95"]
            rows.append(
                (
                    f"{target} - zero-shot",
                    f"{100 * paired['difference']:+.1f} points  (paired 95 % CI {100 * lo:+.1f} to {100 * hi:+.1f}, "
                    f"McNemar p {paired['p_mcnemar']:.2g}; {paired['only_a']} won, {paired['only_b']} lost)",
                )
            )
        if r.get("plugin_scale"):
            rows.append((f"{target} scale", _scale_row(r["plugin_scale"])))
        if "perplexity" in r:
            rows.append((f"{target} perplexity", f"{r['perplexity']:.2f}"))
    return rows


def _scale_row(choice: dict) -> str:
    if choice["chosen_on"] != "val":
        return f"{choice['scale']:g} (eval.plugin_scale)"
    scores = ", ".join(f"{c['scale']:g}: {100 * c['accuracy']:.1f} %" for c in choice["candidates"])
    return f"{choice['scale']:g}, chosen on {choice['candidates'][0]['count']} validation examples ({scores})"
