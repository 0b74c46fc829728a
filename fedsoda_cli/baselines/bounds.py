"""The reference runs every federated result is read against, on fedsoda's own client model.

- central (the upper bound): all clients' data pooled on one client that does the federation's
  whole budget: the same rounds, and each round the steps of all sampled clients together
  (clients_per_round x local_steps of batch_size examples), so the same optimizer steps and
  examples in all. Realignment runs as in fedsoda.

- local (the lower bound): each client trains alone on its own shard, never aggregating: for the
  federation's rounds, each round the steps a client does on average in the federation
  (local_steps x clients_per_round / clients, at least 1), with no realignment (there is no global
  adapter to realign for). Its eval scores every client's adapter and reports the mean and the
  worst client (the interval is that of the mean over the eval examples; held-out perplexity is
  client 0's); it exchanges nothing, so its communication is the one-time model download alone.

The client model (prune, align, quantize) is fedsoda's, so only the federation differs.
"""

from __future__ import annotations

from fedsoda_cli.stages.contract import StageContext, StageResult


def central(ctx: StageContext) -> StageResult:
    """One client holding every training example, with the federation's total steps each round."""
    from fedsoda_cli.baselines.overrides import with_overrides
    from fedsoda_cli.stages.federate import run

    fed = ctx.spec.federate
    pooled = {
        "clients": 1,
        "clients_per_round": 1,
        "min_clients": 1,
        "workers": 1,
        "partition": "iid",
        "local_steps": fed.local_steps * fed.clients_per_round,
    }
    return run(with_overrides(ctx, federate=pooled))


LOCAL_CLIENTS = "clients"  # federate/clients/client-<k>/: one federate output folder per client


def local(ctx: StageContext) -> StageResult:
    """Every client alone: one single-client federation per shard, outputs in clients/client-<k>/."""
    import dataclasses

    from fedsoda_cli import artifacts
    from fedsoda_cli.baselines.overrides import with_overrides
    from fedsoda_cli.federated.console import partition_table
    from fedsoda_cli.stages import federate as stage

    fed = ctx.spec.federate
    shards, stats = stage.client_shards(ctx.spec, ctx.out)
    ctx.console.print(partition_table(stats))
    alone = with_overrides(
        ctx,
        federate={
            "clients": 1,
            "clients_per_round": 1,
            "min_clients": 1,
            "workers": 1,
            "realign_every": 0,
            "local_steps": max(1, round(fed.local_steps * fed.clients_per_round / fed.clients)),
        },
    )
    summaries = {}
    for client, shard in shards.items():
        ctx.console.print(f"[bold]client {client}[/] alone: {len(shard)} examples", highlight=False)
        out = ctx.out / LOCAL_CLIENTS / f"client-{client}"
        out.mkdir(parents=True)
        summaries[client] = stage.federate(
            dataclasses.replace(alone, out=out), {0: shard}, out, f"{stage.CHECKPOINTS}.client-{client}"
        )
    model = sum(s["bytes"]["model"] for s in summaries.values())  # the one-time model download of every client
    summary = {
        "rounds": fed.rounds,
        "clients": len(shards),
        "weighting": None,
        "eval_every": fed.eval_every,
        "bytes": {"model": model, "adapter_down": 0, "adapter_up": 0, "realign": 0, "total": model},
        "final_train_loss": {str(c): s["final_train_loss"] for c, s in summaries.items()},
        "wall_time_s": round(sum(s["wall_time_s"] for s in summaries.values()), 3),
    }
    artifacts.write_json_atomic(ctx.out / "summary.json", summary)
    losses = [loss for loss in summary["final_train_loss"].values() if loss is not None]
    rows = [
        ("clients, each alone", str(len(shards))),
        ("rounds x local steps", f"{fed.rounds} x {alone.spec.federate.local_steps}"),
        ("final train loss, mean over clients", f"{sum(losses) / len(losses):.4f}" if losses else "-"),
        ("communication (model download only)", f"{model:,} B"),
    ]
    return StageResult(metrics={k: v for k, v in summary.items() if k != "final_train_loss"}, summary=rows)


def local_eval(ctx: StageContext) -> StageResult:
    """The eval stage over every client's adapter: per target, the mean and the worst client."""
    import gc

    from fedsoda_cli import artifacts, terminal
    from fedsoda_cli.baselines.overrides import with_overrides
    from fedsoda_cli.data.paths import resolve_data_dir
    from fedsoda_cli.data.tasks import load_task
    from fedsoda_cli.evaluation.stats import wilson_interval
    from fedsoda_cli.spec import spec_dir
    from fedsoda_cli.stages import eval as eval_stage

    spec = ctx.spec
    clients = sorted(ctx.inputs["federate"].joinpath(LOCAL_CLIENTS).glob("client-*"), key=lambda p: int(p.name.split("-")[1]))
    examples = load_task(spec.task, resolve_data_dir(spec.data, spec_dir(spec)), "eval", spec.run.seed, spec_dir=spec_dir(spec))
    per_client_spec = with_overrides(ctx, eval={"perplexity": False}).spec  # perplexity once per target, not per client
    folders = eval_stage.run_folders(ctx)
    results: dict[str, dict] = {}
    with open(ctx.out / eval_stage.PREDICTIONS, "w") as lines, terminal.progress(ctx.console) as bar:
        for target in spec.eval.targets:
            if target == "zero-shot":
                model, tokenizer = eval_stage.build_target(target, spec, folders, ctx.out / eval_stage.PLUGIN_ADAPTER)
                results[target], _ = eval_stage.evaluate_target(target, model, tokenizer, examples, spec, bar, lines)
                del model
                gc.collect()
                continue
            entries = []
            for i, folder in enumerate(clients):
                client_folders = {**folders, "adapter": folder / "adapter"}
                plugin_dir = ctx.out / LOCAL_CLIENTS / folder.name / eval_stage.PLUGIN_ADAPTER
                model, tokenizer = eval_stage.build_target(target, spec, client_folders, plugin_dir, bar)
                # held-out perplexity of the first client's model only: it costs as much as the task eval
                entry = eval_stage.evaluate_target(
                    f"{target} {folder.name}", model, tokenizer, examples, spec if i == 0 else per_client_spec, bar, lines
                )[0]
                if target == "plugin":
                    entry["plugin_scale"] = eval_stage.read_plugin_scale(plugin_dir)
                entries.append(entry)
                del model
                gc.collect()
            accuracies = [e["accuracy"] for e in entries]
            mean, count = sum(accuracies) / len(accuracies), len(examples)
            results[target] = {
                **{k: entries[0][k] for k in ("task", "metric")},
                "accuracy": mean,
                "min_accuracy": min(accuracies),
                "correct": round(mean * count),
                "count": count,
                # the clients are scored on the same examples, so the mean rests on `count` of them, not K x count
                "ci95": list(wilson_interval(round(mean * count), count)),
                **({"perplexity": entries[0]["perplexity"]} if "perplexity" in entries[0] else {}),
                "per_client": [
                    {
                        "client": int(f.name.split("-")[1]),
                        "accuracy": e["accuracy"],
                        "ci95": e["ci95"],
                        **({"plugin_scale": e["plugin_scale"]} if target == "plugin" else {}),
                    }
                    for f, e in zip(clients, entries)
                ],
            }
            if target == "plugin":
                # one scale for the run when every client's adapter got the same, else None (per client)
                scales = {c["plugin_scale"]["scale"] for c in results[target]["per_client"] if c["plugin_scale"]}
                results[target]["plugin_scale"] = {
                    "scale": scales.pop() if len(scales) == 1 else None,
                    "chosen_on": "val" if spec.eval.plugin_scale == "val" else "spec",
                    "candidates": [],
                }
    artifacts.write_json_atomic(ctx.out / eval_stage.RESULTS, results)
    rows = [
        (
            f"{t} accuracy",
            f"{100 * r['accuracy']:.1f} %"
            + (f" (mean; worst client {100 * r['min_accuracy']:.1f} %)" if "min_accuracy" in r else ""),
        )
        for t, r in results.items()
    ]
    return StageResult(metrics={"accuracy": {t: r["accuracy"] for t, r in results.items()}}, summary=rows)
