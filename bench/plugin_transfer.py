"""Which part of a fedsoda adapter transfers to the full LLM: the plugin target rescored with parts of
its adapter taken out or scaled, on the run's own eval examples and on its validation slice.

    FEDSODA_DATA=../shared/data python bench/plugin_transfer.py WORKDIR...

For each finished run it loads the full LLM and the run's plugin adapter (`eval/plugin_adapter`: the
global adapter mapped to original layer indices, as eval scored it) and scores these variants with the
eval stage's function:
- `all`: the adapter as eval scored it (must reproduce the run's plugin accuracy);
- `no_after_gap`: LoRA removed (B set to zero) on each layer right after a removed group, the layer
  whose input the gap changed and whose LoRA trained against that mismatch;
- `no_around_gap`: LoRA removed on both neighbours of each gap;
- `scale_0.5`, `scale_1.5`: the whole update (B) scaled.
Each line: accuracy on the eval split (the reported set) and on the validation slice (disjoint from it,
the one a choice may be made on), and the share of the first label. No training, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

from fedsoda_cli.data.paths import resolve_data_dir
from fedsoda_cli.data.tasks import load_task
from fedsoda_cli.evaluation.targets import load_full, with_adapter
from fedsoda_cli.evaluation.task import evaluate_for_spec
from fedsoda_cli.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from fedsoda_cli.models.layer_map import read_layer_map
from fedsoda_cli.spec.load import validate

VARIANTS = tuple(os.environ.get("VARIANTS", "all,no_after_gap,no_around_gap,scale_0.5,scale_1.5").split(","))


def _layer_of(key: str) -> int | None:
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def variant_state(state: dict[str, torch.Tensor], variant: str, after: set[int], before: set[int]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        layer = _layer_of(key)
        is_b = "lora_B" in key
        if variant == "no_after_gap" and is_b and layer in after:
            value = torch.zeros_like(value)
        elif variant == "no_around_gap" and is_b and (layer in after or layer in before):
            value = torch.zeros_like(value)
        elif variant.startswith("scale_") and is_b:
            value = value * float(variant.split("_")[1])
        out[key] = value.contiguous()
    return out


def main(*workdirs: str) -> None:
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(2)
    for folder in map(Path, workdirs):
        spec_path = folder / "spec.json"
        spec = validate(json.loads(spec_path.read_text()), spec_path)
        layer_map = read_layer_map(folder / "prune" / "layer_map.json")
        kept = set(layer_map.kept)
        after = {layer for layer in kept if layer > 0 and layer - 1 not in kept}
        before = {layer for layer in kept if layer + 1 < layer_map.num_layers and layer + 1 not in kept}
        plugin_dir = folder / "eval" / "plugin_adapter"
        state = load_file(plugin_dir / ADAPTER_WEIGHTS)
        data = resolve_data_dir(spec.data, None)
        splits = {
            "eval": load_task(spec.task, data, "eval", spec.run.seed),
            "val": load_task(spec.task, data, "val", spec.run.seed),
        }
        full, tokenizer = load_full(spec)
        for variant in VARIANTS:
            scratch = Path(tempfile.mkdtemp(prefix="fedsoda-transfer-"))
            try:
                save_file(variant_state(state, variant, after, before), scratch / ADAPTER_WEIGHTS, metadata={"format": "pt"})
                shutil.copy(plugin_dir / ADAPTER_CONFIG, scratch / ADAPTER_CONFIG)
                model = with_adapter(full, scratch)
                cells = []
                for split, examples in splits.items():
                    score = evaluate_for_spec(spec, model, tokenizer, examples)
                    shares = Counter(p.prediction for p in score.predictions)
                    first = sorted(shares)[0]
                    cells.append(f"{split} {100 * score.accuracy:.1f} ({first} {100 * shares[first] / score.count:.0f} %)")
                model.unload()
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            print(f"{folder.name} | {variant} | {' | '.join(cells)}", flush=True)
        del full


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(*sys.argv[1:])
