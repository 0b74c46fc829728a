"""`fedsoda export`: the full LLM with the run's global adapter merged in, as a plain HF checkpoint.

In: a spec and its run workdir with a current `federate/` (the sub-LLM's global adapter) and
`quantize/layer_map.json` (kept layers). The adapter is mapped onto the full model exactly as the
eval stage's plugin target (evaluation.targets), loaded with stock PEFT and merged
(`merge_and_unload`): W <- W + (alpha / r) * B @ A on every adapted linear of a kept layer.
Out: `out_dir` with config.json, model.safetensors, the tokenizer, and fedsoda_export.json (where
it came from), loadable anywhere with `AutoModelForCausalLM.from_pretrained(out_dir)`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from fedsoda_cli.errors import ArtifactError, SpecError

PROVENANCE = "fedsoda_export.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def export_merged(spec, workdir: Path, out_dir: Path, *, dtype: str = "float32") -> Path:
    """Merge the run's plugin adapter into the full model and save it to `out_dir` (replaced
    atomically if it exists) in `dtype` (float32 or bfloat16). Returns `out_dir`."""
    from fedsoda_cli.models.load import save_checkpoint

    if dtype not in DTYPES:
        raise SpecError(f"export dtype {dtype!r} is not supported; use {' or '.join(DTYPES)}")
    workdir = Path(workdir)
    federate = _current_stage(spec, workdir, "federate")
    quantize = _current_stage(spec, workdir, "quantize")
    with tempfile.TemporaryDirectory(prefix="fedsoda-export-") as scratch:
        merged, tokenizer = merge_plugin(spec, federate / "adapter", quantize / "layer_map.json", Path(scratch) / "plugin")
        out = save_checkpoint(merged.to(DTYPES[dtype]), tokenizer, Path(out_dir))
    from fedsoda_cli import artifacts

    provenance = {"workdir": str(workdir.resolve()), "method": spec.run.method, "run": spec.run.name,
                  "federate_digest": artifacts.read_manifest(workdir, "federate").digest(), "dtype": dtype}
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True))
    return out


def merge_plugin(spec, sub_adapter: Path, layer_map_path: Path, plugin_dir: Path):
    """(full model with the mapped adapter merged in, tokenizer); the PEFT plugin folder is written
    to `plugin_dir` on the way."""
    from fedsoda_cli.evaluation import targets
    from fedsoda_cli.models.layers import decoder_layers_path

    full, tokenizer = targets.load_full(spec)
    layer_map = targets.read_layer_map(layer_map_path)
    targets.check_layer_map(full, layer_map, layer_map_path)
    targets.write_plugin_adapter(sub_adapter, layer_map, decoder_layers_path(full), plugin_dir)
    merged = targets.with_adapter(full, plugin_dir).merge_and_unload()
    return merged.eval(), tokenizer


def _current_stage(spec, workdir: Path, name: str) -> Path:
    """The folder of stage `name`, checked present, current for this spec and intact."""
    from fedsoda_cli import artifacts, pipeline

    states = {s.stage: s for s in pipeline.status(spec, workdir)}
    state = states.get(name)
    if state is None or state.state == "missing":
        raise ArtifactError(f"{workdir / name}: '{name}' has not run; run `fedsoda run SPEC` before exporting")
    if state.state != "done":
        raise ArtifactError(f"{workdir / name}: '{name}' is stale ({state.reason}); rerun `fedsoda run SPEC` before exporting")
    artifacts.verify(workdir, artifacts.read_manifest(workdir, name))
    return artifacts.stage_dir(workdir, name)

