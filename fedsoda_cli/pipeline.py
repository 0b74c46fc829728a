"""The pipeline: which stages a method runs, what each reads, and make-like staleness.

A stage is a plain function `run(ctx: StageContext) -> StageResult` (the contract in
`fedsoda_cli/stages/contract.py`); this module only knows its name, its input stages and the spec
sections it depends on, and imports it lazily so that `validate` and `status` stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fedsoda_cli import artifacts
from fedsoda_cli.errors import ArtifactError, SpecError
from fedsoda_cli.spec import Spec, key_hashes, sections_hash
from fedsoda_cli.stages.contract import Stage, StageContext, StageResult

__all__ = [
    "PIPELINES",
    "REALIGN",
    "Stage",
    "StageContext",
    "StageResult",
    "all_stage_names",
    "execute",
    "input_folders",
    "record_spec",
    "stage_named",
    "stages_for",
    "status",
]

_SOURCES = ("model", "data")  # every stage that loads the model or data depends on these


PROFILE = Stage("profile", (), (*_SOURCES, "public_data", "profile"), "fedsoda_cli.stages.profile:run")
# prune reads quantize: prune.storage_budget chooses its blocks by the client bytes that section predicts
PRUNE = Stage(
    "prune", ("profile",), (*_SOURCES, "public_data", "profile", "prune", "quantize", "plugins"), "fedsoda_cli.stages.prune:run"
)
# align and realign read the task's prompt template when align.text = "task_prompts" (Spec.align_prompt),
# never the task's data
ALIGN = Stage(
    "align",
    ("prune",),
    (*_SOURCES, "public_data", "align", "align_prompt", "quantize", "run.seed"),
    "fedsoda_cli.stages.align:run",
)
QUANTIZE = Stage("quantize", ("align",), (*_SOURCES, "public_data", "quantize"), "fedsoda_cli.stages.quantize:run")
# federate reads two keys of [eval]: its per-round evaluation scores the way eval does (the rest of
# [eval], such as the final targets, must not rerun the federation)
FEDERATE = Stage(
    "federate",
    ("quantize",),
    (
        *_SOURCES,
        "public_data",
        "task",
        "lora",
        "federate",
        "align",
        "realign",
        "run.seed",
        "plugins",
        "eval.batch_size",
        "eval.max_new_tokens",
    ),
    "fedsoda_cli.stages.federate:run",
)
EVAL = Stage(
    "eval", ("federate", "quantize"), (*_SOURCES, "public_data", "task", "eval", "run.seed"), "fedsoda_cli.stages.eval:run"
)

# The baselines (fedsoda_cli/baselines) reuse fedsoda's stages where they can and name their own
# where they differ; run.method is a closed Literal, so every method is listed here.
PIPELINES: dict[str, tuple[Stage, ...]] = {
    "fedsoda": (PROFILE, PRUNE, ALIGN, QUANTIZE, FEDERATE, EVAL),
    "fedpetuning": (
        Stage("base", (), _SOURCES, "fedsoda_cli.baselines.fedpetuning:base"),
        Stage("quantize", ("base",), (*_SOURCES, "public_data", "quantize"), "fedsoda_cli.stages.quantize:run"),
        Stage("federate", ("quantize",), FEDERATE.sections, "fedsoda_cli.baselines.fedpetuning:federate"),
        EVAL,
    ),
    "fedot": (
        Stage("prune", (), (*_SOURCES, "fedot"), "fedsoda_cli.baselines.fedot:emulator"),
        Stage("align", ("prune",), (*ALIGN.sections, "fedot"), "fedsoda_cli.baselines.fedot:align"),
        QUANTIZE,
        Stage("federate", ("quantize",), (*FEDERATE.sections, "fedot"), "fedsoda_cli.baselines.fedot:federate"),
        EVAL,
    ),
    "central": (
        PROFILE,
        PRUNE,
        ALIGN,
        QUANTIZE,
        Stage("federate", ("quantize",), FEDERATE.sections, "fedsoda_cli.baselines.bounds:central"),
        EVAL,
    ),
    "local": (
        PROFILE,
        PRUNE,
        ALIGN,
        QUANTIZE,
        Stage("federate", ("quantize",), FEDERATE.sections, "fedsoda_cli.baselines.bounds:local"),
        Stage("eval", ("federate", "quantize"), EVAL.sections, "fedsoda_cli.baselines.bounds:local_eval"),
    ),
}

# `fedsoda realign SPEC --adapter DIR`: a stage of its own, run on demand, in no method's list
REALIGN = Stage(
    "realign",
    ("align", "quantize"),
    (*_SOURCES, "public_data", "align", "align_prompt", "realign", "quantize", "run.seed"),
    "fedsoda_cli.stages.realign:run",
)


def all_stage_names() -> frozenset[str]:
    """The name of every stage folder some method, or `fedsoda realign`, writes into a workdir."""
    return frozenset({REALIGN.name, *(stage.name for stages in PIPELINES.values() for stage in stages)})


def stages_for(spec: Spec) -> tuple[Stage, ...]:
    try:
        return PIPELINES[spec.run.method]
    except KeyError:
        raise SpecError(f"run.method = {spec.run.method!r} has no pipeline yet; use 'fedsoda'") from None


def stage_named(spec: Spec, name: str) -> Stage:
    for stage in stages_for(spec):
        if stage.name == name:
            return stage
    names = ", ".join(s.name for s in stages_for(spec))
    raise SpecError(f"stage '{name}' is not part of run.method = {spec.run.method!r}; its stages are: {names}")


@dataclass
class StageStatus:
    stage: str
    state: str  # done | stale | missing
    reason: str = ""


def status(spec: Spec, workdir: Path) -> list[StageStatus]:
    """done / stale / missing for every stage of the spec's method, in pipeline order."""
    result: dict[str, StageStatus] = {}
    for stage in stages_for(spec):
        result[stage.name] = _status_of(spec, workdir, stage, result)
    return list(result.values())


def _status_of(spec: Spec, workdir: Path, stage: Stage, earlier: dict[str, StageStatus]) -> StageStatus:
    manifest = artifacts.read_manifest(workdir, stage.name)
    if manifest is None:
        return StageStatus(stage.name, "missing", "not run yet")
    if manifest.spec_hash != sections_hash(spec, stage.sections):
        return StageStatus(stage.name, "stale", _spec_change(manifest, spec, stage))
    for name in stage.inputs:
        upstream = artifacts.read_manifest(workdir, name)
        if earlier.get(name) and earlier[name].state != "done":
            return StageStatus(stage.name, "stale", f"input '{name}' is {earlier[name].state}")
        if upstream is None or manifest.inputs.get(name) != upstream.digest():
            return StageStatus(stage.name, "stale", f"input '{name}' changed since this stage ran")
    return StageStatus(stage.name, "done")


_SHOWN_KEYS = 4  # a stale reason names at most this many changed keys


def _spec_change(manifest: artifacts.Manifest, spec: Spec, stage: Stage) -> str:
    """Which spec keys changed since the stage ran, or, for a manifest that predates per-key hashes
    (or a change no key shows, such as a section a newer fedsoda reads), the sections it reads."""
    now = key_hashes(spec, stage.sections)
    changed = sorted(key for key in now.keys() | manifest.spec_keys.keys() if now.get(key) != manifest.spec_keys.get(key))
    if not manifest.spec_keys or not changed:
        return f"spec sections changed: one of {', '.join(stage.sections)}"
    shown = ", ".join(changed[:_SHOWN_KEYS]) + (f" and {len(changed) - _SHOWN_KEYS} more" if len(changed) > _SHOWN_KEYS else "")
    return f"spec changed since it ran: {shown}"


def input_folders(spec: Spec, workdir: Path, stage: Stage) -> tuple[dict[str, Path], dict[str, str]]:
    """The folders and manifest digests of a stage's inputs, checked complete, intact and current."""
    folders, digests = {}, {}
    states = {s.stage: s for s in status(spec, workdir)}
    for name in stage.inputs:
        manifest = artifacts.read_manifest(workdir, name)
        if manifest is None:
            raise ArtifactError(
                f"stage '{stage.name}' needs the output of '{name}' in {workdir / name}; run `fedsoda {name} SPEC` first"
            )
        if states[name].state == "stale":
            raise ArtifactError(
                f"input '{name}' in {workdir / name} is stale ({states[name].reason}); rerun `fedsoda {name} SPEC` (or `fedsoda run SPEC`)"
            )
        artifacts.verify(workdir, manifest)
        folders[name] = artifacts.stage_dir(workdir, name)
        digests[name] = manifest.digest()
    return folders, digests


def execute(spec: Spec, workdir: Path, stage: Stage, console: Console, **options: Any) -> artifacts.Manifest:
    """Run one stage: check its inputs, run it into a scratch folder, swap it in, print its summary."""
    from fedsoda_cli import seeding, terminal

    with artifacts.workdir_lock(workdir):  # the CLI already holds it for the whole command; this guards library callers
        inputs, digests = input_folders(spec, workdir, stage)
        seeding.prepare(spec)
        terminal.quiet_third_party()
        with artifacts.write_stage(
            workdir, stage.name, sections_hash(spec, stage.sections), digests, key_hashes(spec, stage.sections)
        ) as writer:
            ctx = StageContext(
                spec=spec,
                workdir=workdir,
                out=writer.path,
                inputs=inputs,
                console=console,
                options=options,
                sections=stage.sections,
            )
            result = stage.function()(ctx)
            writer.manifest.metrics = result.metrics
        record_spec(spec, workdir)  # only once the stage succeeded: a failed attempt must not relabel the run
        manifest = artifacts.require_manifest(workdir, stage.name)
    terminal.stage_summary(console, stage.name, result.summary, manifest)
    return manifest


def record_spec(spec: Spec, workdir: Path) -> None:
    """Keep the resolved spec beside the artifacts, so reports know what a run was."""
    artifacts.ensure_workdir(workdir)
    artifacts.write_json_atomic(workdir / "spec.json", spec.model_dump(mode="json"))
