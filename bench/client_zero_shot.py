"""Where each run's client model starts: its task accuracy with no adapter, on the run's own eval examples.

    FEDSODA_DATA=../shared/data python bench/client_zero_shot.py WORKDIR...

For each finished run it loads `quantize/model` (the model a client trains on: the NF4 sub-LLM for
fedsoda, the NF4 full model for fedpetuning-NF4) with the sub target's loader, without an adapter, and
scores it with the eval stage's function on the eval split the run's spec.json names. Beside the run's
own plugin and sub accuracy this splits the gap to zero-shot into what pruning and quantization cost the
client model before training and what training and the transfer did after. Runs with byte-identical
client models and the same task settings are scored once.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import torch

from fedsoda_cli.data.paths import resolve_data_dir
from fedsoda_cli.data.tasks import load_task
from fedsoda_cli.evaluation.targets import load_sub
from fedsoda_cli.evaluation.task import evaluate_for_spec
from fedsoda_cli.spec.load import validate


def client_digest(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(model_dir.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def main(*workdirs: str) -> None:
    torch.set_num_threads(2)
    scored: dict[str, str] = {}
    for folder in map(Path, workdirs):
        spec_path = folder / "spec.json"
        spec = validate(json.loads(spec_path.read_text()), spec_path)
        model_dir = folder / "quantize" / "model"
        results_path = folder / "eval" / "results.json"  # absent for a run taken only --to quantize
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        trained = ", ".join(f"{t} {100 * r['accuracy']:.1f}" for t, r in results.items()) or "-"
        key = client_digest(model_dir) + json.dumps(spec.task.model_dump(mode="json"), sort_keys=True)
        if key not in scored:
            examples = load_task(spec.task, resolve_data_dir(spec.data, None), "eval", spec.run.seed)
            model, tokenizer = load_sub(model_dir, adapter_dir=None)
            score = evaluate_for_spec(spec, model, tokenizer, examples)
            summary = score.summary()
            shares = Counter(p.prediction for p in score.predictions)
            lo, hi = summary["ci95"]
            scored[key] = (
                f"client model, no adapter {100 * summary['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] "
                f"(predicted {', '.join(f'{label} {n}' for label, n in sorted(shares.items()))})"
            )
            del model
        print(f"{folder.name} | {scored[key]} | trained: {trained}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(*sys.argv[1:])
