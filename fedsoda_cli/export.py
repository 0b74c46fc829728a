"""`fedsoda export`: the full LLM with the run's global adapter merged in, as a plain HF checkpoint.

In: a spec and its run workdir with a current `federate/` (the sub-LLM's global adapter) and
`quantize/layer_map.json` (kept layers). The adapter is mapped onto the full model exactly as the
eval stage's plugin target (evaluation.targets), at the same plug-in scale s (`eval.plugin_scale`;
for "val" the one the eval stage chose, so eval must be current), loaded with stock PEFT and merged
(`merge_and_unload`): W <- W + s * (alpha / r) * B @ A on every adapted linear of a kept layer.
Out: `out_dir` with config.json, model.safetensors, the tokenizer, and fedsoda_export.json (where
it came from), loadable anywhere with `AutoModelForCausalLM.from_pretrained(out_dir)`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from fedsoda_cli.errors import ArtifactError, SpecError
from fedsoda_cli.models.layer_map import LAYER_MAP, read_layer_map

PROVENANCE = "fedsoda_export.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def export_merged(spec, workdir: Path, out_dir: Path, *, dtype: str = "float32") -> Path:
    """Merge the run's plugin adapter into the full model and save it to `out_dir` (replaced
    atomically if it holds an earlier fedsoda export) in `dtype` (float32 or bfloat16). Returns `out_dir`."""
    from fedsoda_cli import artifacts
    from fedsoda_cli.models.load import save_checkpoint

    if dtype not in DTYPES:
        raise SpecError(f"export dtype {dtype!r} is not supported; use {' or '.join(DTYPES)}")
    workdir, out = Path(workdir), Path(out_dir)
    # An export killed mid-swap left the earlier one under its retired name: back first, then replaced.
    artifacts.recover_folder(out, complete=lambda folder: (folder / PROVENANCE).is_file())
    check_out_dir(out, workdir)  # before the merge, so a refusal costs nothing
    federate = _current_stage(spec, workdir, "federate")
    quantize = _current_stage(spec, workdir, "quantize")
    scale = plugin_scale(spec, workdir)
    provenance = {
        "workdir": str(workdir.resolve()),
        "method": spec.run.method,
        "run": spec.run.name,
        "federate_digest": artifacts.require_manifest(workdir, "federate").digest(),
        "dtype": dtype,
        "plugin_scale": scale,
    }
    _make_parent(out)
    # Beside `out`, so the finished folder is renamed into place: a half export never sits at `out`,
    # and the marker is inside before it gets there.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.partial-", dir=out.parent) as scratch:
        merged, tokenizer = merge_plugin(spec, federate / "adapter", quantize / LAYER_MAP, Path(scratch) / "plugin", scale=scale)
        staged = save_checkpoint(merged.to(DTYPES[dtype]), tokenizer, Path(scratch) / "export")
        (staged / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True))
        check_out_dir(out, workdir)  # again: `out` may have been filled while the merge ran
        artifacts.replace_folder(staged, out)
    return out


def check_out_dir(out: Path, workdir: Path) -> None:
    """An ArtifactError unless `out` may receive an export: absent, an empty folder, or an earlier
    fedsoda export (it carries fedsoda_export.json), and clear of every run's stage folders."""
    from fedsoda_cli import artifacts, pipeline

    resolved, run = out.resolve(), workdir.resolve()
    stage_names = pipeline.all_stage_names()  # every method's: the workdir may hold another method's folders
    how = "choose another --out (a new folder, or an earlier fedsoda export to replace)"
    if resolved == run or resolved in run.parents:
        raise ArtifactError(f"{out}: is or contains the run's workdir {run}, which the export would replace; {how}")
    if run in resolved.parents:
        first = run / resolved.relative_to(run).parts[0]
        if first.name.startswith(".") or first.name in stage_names or first.name.endswith(".checkpoints"):
            raise ArtifactError(
                f"{out}: {'is' if first == resolved else 'lies inside'} {first}, which fedsoda stages write; {how}"
            )
    for folder in (resolved, *resolved.parents):
        if artifacts.is_stage_folder(folder):
            raise ArtifactError(
                f"{out}: {'is' if folder == resolved else 'lies inside'} the fedsoda stage folder {folder}; {how}"
            )
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ArtifactError(f"{out}: exists and is not a folder, and export replaces only its own folders; {how}")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise ArtifactError(
            f"{out}: this folder holds files but no {PROVENANCE}, so it is not an earlier fedsoda export "
            f"and will not be replaced; {how}"
        )


def is_export(folder: Path) -> bool:
    """Whether `folder` is a fedsoda export: its provenance file is there and reads as one."""
    try:
        data = json.loads((folder / PROVENANCE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "federate_digest" in data


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ArtifactError(f"{out}: a file is in the way of its parent folder; choose another --out") from None


def plugin_scale(spec, workdir: Path) -> float:
    """The plug-in scale the eval stage's plugin target uses: the spec's, or for "val" the one the
    current eval stage chose on the validation slice."""
    from fedsoda_cli.stages import eval as eval_stage

    if spec.eval.plugin_scale != "val":
        return float(spec.eval.plugin_scale)
    folder = _current_stage(spec, workdir, "eval")
    choice = eval_stage.read_plugin_scale(folder / eval_stage.PLUGIN_ADAPTER)
    if choice is None:
        raise ArtifactError(
            f'{folder}: eval.plugin_scale = "val" but eval recorded no chosen scale (its targets lack plugin?); '
            "add plugin to eval.targets and rerun `fedsoda eval SPEC`, or set eval.plugin_scale to a number"
        )
    return float(choice["scale"])


def merge_plugin(spec, sub_adapter: Path, layer_map_path: Path, plugin_dir: Path, *, scale: float = 1.0):
    """(full model with the mapped adapter merged in at plug-in scale `scale`, tokenizer); the PEFT
    plugin folder is written to `plugin_dir` on the way."""
    from fedsoda_cli.evaluation import targets
    from fedsoda_cli.models.layers import decoder_layers_path

    full, tokenizer = targets.load_full(spec)
    layer_map = read_layer_map(layer_map_path)
    targets.check_layer_map(full, layer_map, layer_map_path)
    targets.write_plugin_adapter(sub_adapter, layer_map, decoder_layers_path(full), plugin_dir, scale=scale)
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
    artifacts.verify(workdir, artifacts.require_manifest(workdir, name))
    return artifacts.stage_dir(workdir, name)
