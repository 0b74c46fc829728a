"""Benchmark: the federate stage on Flower's deployment engine against the local backend, same spec.

    python bench/flower_vs_local.py                 # tiny random llama, 2 clients, 3 rounds (~2 min)
    python bench/flower_vs_local.py --rounds 5 --clients 2

Both runs use the federated tests' tiny quantized sub-LLM and their SST-2 spec (no realignment),
the local backend with one worker process per client, Flower with a SuperLink and one SuperNode
per client on 127.0.0.1. Prints a markdown table: per-round wall time (first round apart: it
holds the sites' one model load), communication the ledger accounts (identical by construction),
the bytes Flower serialized for its messages, and whether the final adapters are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsoda_cli import pipeline  # noqa: E402
from fedsoda_cli.federated.flower.federation import LoopbackFederation, Site  # noqa: E402
from fedsoda_cli.federated.flower.shards import write_shards  # noqa: E402
from fedsoda_cli.round_record import RoundRecord  # noqa: E402
from fedsoda_cli.spec import load_spec  # noqa: E402


def build_sub_llm(root: Path) -> dict[str, Path]:
    """The tests' tiny sub-LLM (tiny random llama, layer 3 pruned), float and NF4."""
    from fedsoda_cli.models.layers import drop_layers
    from fedsoda_cli.models.load import load_causal_lm, save_checkpoint
    from fedsoda_cli.models.quantized import quantize_checkpoint, save_client_model
    from fedsoda_cli.spec.schema import ModelSpec, QuantizeSpec
    from tests.federated.conftest import LAYER_MAP

    model, tokenizer = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    drop_layers(model, LAYER_MAP.removed_groups[0])
    save_checkpoint(model, tokenizer, root / "float")
    save_client_model(quantize_checkpoint(root / "float", QuantizeSpec()), tokenizer, root / "client")
    return {"float": root / "float", "client": root / "client"}


def run(spec, workdir) -> dict:
    started = time.perf_counter()
    pipeline.execute(spec, workdir, pipeline.stage_named(spec, "federate"), Console(quiet=True))
    out = workdir / "federate"
    lines = [RoundRecord.from_json(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall": time.perf_counter() - started, "lines": lines, "summary": json.loads((out / "summary.json").read_text())}


def main() -> None:
    from tests.federated.conftest import prepare_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    overrides = [
        f"federate.clients={args.clients}",
        f"federate.clients_per_round={args.clients}",
        f"federate.rounds={args.rounds}",
        "federate.realign_every=0",
        f"federate.workers={args.clients}",
        f"run.threads={args.clients}",
    ]
    with tempfile.TemporaryDirectory(prefix="fedsoda-bench-") as scratch:
        root = Path(scratch)
        sub_llm = build_sub_llm(root / "sub-llm")
        spec, workdir, _ = prepare_run(root / "local", sub_llm, overrides)
        local = run(spec, workdir)
        flower_overrides = [*overrides, 'federate.backend="flower"']
        spec, workdir, spec_path = prepare_run(root / "flower", sub_llm, flower_overrides)
        shards = write_shards(spec, root / "shards")
        sites = [Site(client, workdir / "quantize" / "model", shard) for client, shard in shards.items()]
        with LoopbackFederation(sites, root / "federation") as fed:
            spec = load_spec(spec_path, [*flower_overrides, f'federate.flower_superlink="{fed.address}"'])
            flower = run(spec, workdir)
    print(table(local, flower, args))


def table(local: dict, flower: dict, args) -> str:
    def later(result):  # rounds after the first (the first holds the sites' model load)
        seconds = [line.seconds for line in result["lines"][1:]]
        return statistics.mean(seconds) if seconds else float("nan")

    ledger = flower["summary"]["bytes"]
    wire = flower["summary"]["wire_bytes"]
    same = local["lines"][-1].global_digest == flower["lines"][-1].global_digest
    return "\n".join(
        [
            f"{args.clients} clients x {args.rounds} rounds, tiny random llama (NF4), SST-2",
            "",
            "| | local (worker processes) | flower (SuperLink + SuperNodes, loopback) |",
            "|---|---|---|",
            f"| round 1 (s, incl. model load) | {local['lines'][0]['seconds']:.2f} | {flower['lines'][0]['seconds']:.2f} |",
            f"| later rounds, mean (s) | {later(local):.2f} | {later(flower):.2f} |",
            f"| stage wall time (s) | {local['wall']:.1f} | {flower['wall']:.1f} |",
            f"| adapters down / up, ledger (bytes) | {local['summary']['bytes']['adapter_down']} / {local['summary']['bytes']['adapter_up']} "
            f"| {ledger['adapter_down']} / {ledger['adapter_up']} |",
            f"| Flower messages serialized, down / up (bytes) | - | {wire['down']} / {wire['up']} ({wire['messages']} messages) |",
            f"| final adapter bit-identical | | {'yes' if same else 'NO'} |",
        ]
    )


if __name__ == "__main__":
    main()
