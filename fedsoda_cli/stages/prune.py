"""Stage 2, prune: remove layer groups chosen by a pruning strategy, giving the sub-LLM.

In: `profile/distances.json` (the full model's LayerProfile) and the spec's [prune] section.
Out (in the stage folder):
  model/           the sub-LLM as a float32 HF checkpoint, layers re-indexed (KV cache works)
  layer_map.json   {"kept": [original index of each sub-LLM layer], "removed_groups": [[...], ...],
                    "num_layers": L, "strategy": name, "iterative": bool} (models/layer_map.py)

Any strategy's output, built-in or third-party, is checked by `validate_selection` before a layer
is touched. With `prune.iterative`, groups are accepted one at a time and the pruned model is
re-profiled on the same public text before the next choice.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import replace

from fedsoda_cli.errors import ArtifactError, FedsodaError, PluginError, SpecError
from fedsoda_cli.models.layer_map import LAYER_MAP, LayerMap
from fedsoda_cli.plugins.contracts import LayerProfile, Pruner
from fedsoda_cli.plugins.pruners import (
    SimilarityGroupPruner,
    admissible_starts,
    check_request,
    protected_layers,
    too_few_blocks,
)
from fedsoda_cli.spec.schema import PruneSpec
from fedsoda_cli.stages.contract import StageContext, StageResult

MODEL_DIR = "model"


def run(ctx: StageContext) -> StageResult:
    """Select the removed groups, drop them from the full model, save the sub-LLM and layer map."""
    from fedsoda_cli.models.layers import decoder_layers, drop_layers
    from fedsoda_cli.models.load import load_causal_lm
    from fedsoda_cli.plugins import load_plugin_files, pruners
    from fedsoda_cli.spec import spec_dir
    from fedsoda_cli.stages.profile import read_profile

    spec, config = ctx.spec, ctx.spec.prune
    load_plugin_files(spec.plugins, spec_dir(spec))  # a no-op for files the CLI already imported
    profile = read_profile(ctx.inputs["profile"])
    pruner = pruners.create(config.strategy)
    if config.storage_budget is None:
        check_request(profile.num_layers, config)
    if config.iterative and not pruner.supports_iterative:
        raise SpecError(
            f"prune.iterative = true, but strategy '{config.strategy}' does not support iterative pruning; use prune.strategy = \"sgp\" or set prune.iterative = false"
        )

    model, tokenizer = load_causal_lm(spec.model)
    num_layers = len(decoder_layers(model))
    if num_layers != profile.num_layers:
        raise ArtifactError(
            f"{ctx.inputs['profile']}: the profile has {profile.num_layers} layers but the model has {num_layers}; rerun `fedsoda profile SPEC --force`"
        )
    params_full = _parameter_count(model)

    budget = rerank = None
    if config.storage_budget is not None:
        groups, budget = _select_to_budget(ctx, profile, model, tokenizer, params_full)
        drop_layers(model, [layer for group in groups for layer in group])
    elif config.rerank_top_k > 1:
        groups, rerank = _select_reranked(ctx, profile, model, tokenizer)
        drop_layers(model, [layer for group in groups for layer in group])
    elif config.iterative:
        groups = _select_iteratively(ctx, pruner, profile, model, tokenizer)
    else:
        groups = validate_selection(_call(pruner, profile, config), num_layers, config, config.strategy)
        drop_layers(model, [layer for group in groups for layer in group])
    return write_sub_llm(
        ctx, model, tokenizer, groups, num_layers, params_full, config.strategy, config.iterative, budget, rerank
    )


def _select_reranked(ctx: StageContext, profile: LayerProfile, model, tokenizer) -> tuple[list[list[int]], dict]:
    """sgp with `prune.rerank_top_k`: each of the p groups is the one of the k lowest-distance
    blocks (non-overlapping with those accepted, off the protected layers) whose removal, with the
    groups accepted so far, gives the lowest perplexity on the first rerank_sequences public
    windows. Angular distance only ranks the candidates; the measured model decides. The public
    windows are the profiling ones, never the held-out text perplexity is reported on."""
    import copy
    import time

    from fedsoda_cli import terminal
    from fedsoda_cli.evaluation.perplexity import perplexity
    from fedsoda_cli.models.layers import drop_layers
    from fedsoda_cli.stages.profile import public_input_ids

    spec, config = ctx.spec, ctx.spec.prune
    n, p, k = config.group_size, config.groups, config.rerank_top_k
    if n not in profile.distances:
        raise SpecError(f"prune.group_size = {n} needs d_{n}(l); raise profile.max_span to at least {n} and rerun profile")
    started = time.perf_counter()
    windows = public_input_ids(spec, tokenizer)[: config.rerank_sequences]
    distances, protected = profile.distances[n], protected_layers(profile.num_layers, config)
    accepted: list[list[int]] = []
    trials: list[dict] = []
    with terminal.progress(ctx.console) as bar:
        task = bar.add_task("re-rank", total=p * k, status=f"top {k} blocks by distance, by perplexity")
        for _ in range(p):
            ranked = admissible_starts(distances, n, accepted, protected, config.min_kept_between)[:k]
            if not ranked:
                raise SpecError(too_few_blocks(config, len(accepted), profile.num_layers, sorted(protected)))
            scored = []
            for start in ranked:
                trial = copy.deepcopy(model)
                drop_layers(trial, [layer for g in accepted for layer in g] + list(range(start, start + n)))
                ppl = perplexity(trial.eval(), windows, batch_size=spec.profile.batch_size).perplexity
                del trial
                scored.append((ppl, ranked.index(start), start))
                trials.append(
                    {"group": len(accepted) + 1, "block": [start, start + n - 1], "distance": distances[start], "ppl": ppl}
                )
                bar.advance(task)
            _, _, best = min(scored)
            accepted.append(list(range(best, best + n)))
    by_distance = SimilarityGroupPruner().select(profile, config)
    record = {
        "top_k": k,
        "sequences": int(windows.shape[0]),
        "trials": trials,
        "by_distance": by_distance,
        "changed": sorted(accepted) != by_distance,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return sorted(accepted), record


def _select_to_budget(
    ctx: StageContext, profile: LayerProfile, model, tokenizer, params_full: int
) -> tuple[list[list[int]], dict]:
    """`prune.storage_budget`: the fewest layers whose removal fits the predicted client bytes in
    the budget, then the exact minimum-distance blocks removing at least that many."""
    from fedsoda_cli.models import storage
    from fedsoda_cli.plugins.pruners import budget_blocks

    spec, config = ctx.spec, ctx.spec.prune
    assert config.storage_budget is not None  # run() chooses this path only with a budget
    budget = storage.budget_bytes(config.storage_budget, params_full * 2)
    prediction = storage.predict_client_bytes(model, tokenizer, spec.quantize, ctx.out)
    L = profile.num_layers
    need = storage.layers_to_remove(prediction, L, budget)
    if need > L:
        raise SpecError(
            f"prune.storage_budget = {config.storage_budget} ({budget:,} B) is below what the client model weighs "
            f"with no decoder layer at all ({prediction.bytes_with(0):,} B predicted); raise prune.storage_budget"
        )
    groups = budget_blocks(profile, config, need)
    removed = sum(len(g) for g in groups)
    record = {
        "budget_bytes": budget,
        "fraction_of_full_bf16": round(budget / (params_full * 2), 4),
        "prediction": prediction.to_dict(),
        "predicted_client_bytes": prediction.bytes_with(L - removed),
        "layers_needed": need,
        "layers_removed": removed,
        "total_distance": round(sum(profile.distances[len(g)][g[0]] for g in groups), 6),
    }
    return groups, record


def write_sub_llm(
    ctx: StageContext,
    model,
    tokenizer,
    groups: list[list[int]],
    num_layers: int,
    params_full: int,
    strategy: str,
    iterative: bool = False,
    budget: dict | None = None,
    rerank: dict | None = None,
) -> StageResult:
    """Save the (already pruned) sub-LLM and its layer map into the stage folder; the summary rows.
    `budget`: prune.storage_budget's record, kept in the layer map so quantize can check the actual
    bytes; `rerank`: prune.rerank_top_k's trials."""
    from fedsoda_cli.models.load import save_checkpoint

    removed = {layer for group in groups for layer in group}
    kept = [layer for layer in range(num_layers) if layer not in removed]
    params_sub = _parameter_count(model)
    save_checkpoint(model, tokenizer, ctx.out / MODEL_DIR)
    LayerMap(kept, num_layers, groups, strategy, iterative, storage_budget=budget).write(ctx.out / LAYER_MAP)
    metrics = {"removed_groups": groups, "kept": len(kept), "params_full": params_full, "params_sub": params_sub}
    if budget is not None:
        metrics["storage_budget"] = budget
    if rerank is not None:
        metrics["rerank"] = rerank
    summary = [
        (
            "strategy",
            strategy
            + (" (iterative)" if iterative else "")
            + (f", at least {spacing} kept layer(s) between groups" if (spacing := ctx.spec.prune.min_kept_between) else ""),
        ),
        ("removed groups", ", ".join(f"{g[0]}..{g[-1]}" for g in groups) or "none"),
        ("kept layers", f"{len(kept)} of {num_layers}"),
        ("parameters", f"{params_full / 1e6:.1f} M -> {params_sub / 1e6:.1f} M ({100 * (params_sub / params_full - 1):+.1f} %)"),
    ]
    if rerank is not None:
        summary.insert(
            1,
            (
                "re-ranked",
                f"top {rerank['top_k']} blocks per group by perplexity on {rerank['sequences']} public windows "
                f"({'changed' if rerank['changed'] else 'same as'} the distance order"
                + (f", by distance: {', '.join(f'{g[0]}..{g[-1]}' for g in rerank['by_distance'])}" if rerank["changed"] else "")
                + f"; {len(rerank['trials'])} trials, {rerank['seconds']:.1f} s)",
            ),
        )
    if budget is not None:
        summary.insert(
            1,
            (
                "storage budget",
                f"{budget['budget_bytes']:,} B; predicted client model {budget['predicted_client_bytes']:,} B "
                f"({budget['layers_removed']} layers removed, total distance {budget['total_distance']:.4f})",
            ),
        )
    return StageResult(metrics=metrics, summary=summary)


def validate_selection(groups: object, num_layers: int, config: PruneSpec, strategy: str) -> list[list[int]]:
    """Check a strategy's `select` output against the Pruner contract and return it normalised
    (plain ints, each group ascending, groups ordered by first layer). PluginError naming the
    strategy and the first broken rule otherwise."""

    def broken(what: str) -> PluginError:
        return PluginError(
            f"pruning strategy '{strategy}' returned an invalid selection: {what}; fix its select() (see docs/plugins.md)"
        )

    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, (list, tuple)) for g in groups):
        raise broken(f"{_short(groups)} is not a list of lists of layer indices")
    for group in groups:
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in group):
            raise broken(f"group {_short(group)} holds something other than integer layer indices")
    clean = sorted(sorted(int(i) for i in group) for group in groups)
    for group in clean:
        if not group:
            raise broken("an empty group")
        if group != list(range(group[0], group[0] + len(group))):
            raise broken(f"group {group} is not a run of consecutive layers")
        if group[0] < 0 or group[-1] >= num_layers:
            raise broken(f"group {group} is outside the layers 0..{num_layers - 1}")
    flat = [layer for group in clean for layer in group]
    if len(flat) != len(set(flat)):
        twice = sorted({layer for layer in flat if flat.count(layer) > 1})
        raise broken(f"groups overlap at layers {twice}")
    touched = sorted(set(flat) & protected_layers(num_layers, config))
    if touched:
        raise broken(f"it removes protected layers {touched} (prune.protect_first / prune.protect_last)")
    if len(flat) >= num_layers:
        raise broken(f"it removes all {num_layers} layers")
    asked = config.groups * config.group_size
    if len(flat) != asked:
        raise broken(f"it removes {len(flat)} layers, but prune.groups x prune.group_size = {asked}")
    return clean


def _select_iteratively(ctx: StageContext, pruner: Pruner, profile: LayerProfile, model, tokenizer) -> list[list[int]]:
    """Accept one group at a time; after each, drop it from `model` (in place) and re-profile the
    pruned model on the same public text. Returns the groups in original layer indices."""
    from fedsoda_cli import terminal
    from fedsoda_cli.models.layers import drop_layers
    from fedsoda_cli.sgp.angular import measure
    from fedsoda_cli.stages.profile import public_input_ids

    spec, config = ctx.spec, ctx.spec.prune
    one = config.model_copy(update={"groups": 1})
    kept = list(range(profile.num_layers))  # kept[i] = original index of the current layer i
    groups: list[list[int]] = []
    input_ids = public_input_ids(spec, tokenizer) if config.groups > 1 else None
    with terminal.progress(ctx.console) as bar:
        task = bar.add_task(
            "re-profile", total=max(0, config.groups - 1) * (0 if input_ids is None else len(input_ids)), status=""
        )
        for step in range(config.groups):
            if step > 0:
                assert input_ids is not None  # read above, as config.groups > 1
                profile = measure(
                    model,
                    input_ids,
                    None,
                    config.group_size,
                    spec.profile.tokens,
                    spec.profile.batch_size,
                    progress=lambda k: bar.advance(task, k),
                )
            current = validate_selection(
                _call(pruner, _without_straddling(profile, kept, config.group_size), one), len(kept), one, config.strategy
            )[0]
            original = [kept[i] for i in current]
            if original != list(range(original[0], original[0] + len(original))):
                raise PluginError(
                    f"pruning strategy '{config.strategy}' chose current layers {current}, which straddle an earlier gap (original layers {original}); an iterative strategy must skip blocks with a non-finite distance"
                )
            groups.append(original)
            drop_layers(model, current)
            kept = [k for i, k in enumerate(kept) if i not in set(current)]
    return sorted(groups)


def _without_straddling(profile: LayerProfile, kept: list[int], span: int) -> LayerProfile:
    """`profile` with d_span(l) set to +inf where the block l..l+span-1 of the current model is not
    consecutive in original indices (it would straddle a gap left by an earlier group)."""
    if span not in profile.distances:
        return profile
    row = [d if kept[layer + span - 1] - kept[layer] == span - 1 else math.inf for layer, d in enumerate(profile.distances[span])]
    return replace(profile, distances={**profile.distances, span: row})


def _call(pruner: Pruner, profile: LayerProfile, config: PruneSpec) -> object:
    """`pruner.select`, with a crash of third-party code turned into a one-line PluginError."""
    try:
        return pruner.select(profile, config)
    except FedsodaError:
        raise
    except Exception as exc:
        raise PluginError(
            f"pruning strategy '{config.strategy}' ({type(pruner).__module__}) failed in select(): {type(exc).__name__}: {exc}"
        ) from None


def _parameter_count(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
