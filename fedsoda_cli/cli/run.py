"""`fedsoda run SPEC`: every stage in order, skipping those already up to date (like make).

With `--seeds 0,1,2` the pipeline runs once per seed, into sibling workdirs `<workdir>-seed<k>`
(the workdir of the spec or --workdir, with run.seed = k). A stage that does not read run.seed, and
whose inputs do not either, gives the same output for every seed: for the seeds after the first it is
copied from the first seed's workdir instead of being run again. The copy has the same spec hash,
inputs and output bytes as the original, so `fedsoda status` sees it as done, and a later change to
its spec sections makes it stale as usual.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedsoda_cli import artifacts, pipeline
from fedsoda_cli.cli.common import SetOpt, SpecArg, WorkdirOpt, console, handles_errors, open_spec
from fedsoda_cli.cli.federate import ResumeOpt
from fedsoda_cli.errors import ArtifactError, SpecError

SEED_KEY = "run.seed"


@handles_errors
def run(
    spec: SpecArg,
    set: SetOpt = None,
    workdir: WorkdirOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun stages even when up to date.")] = False,
    from_stage: Annotated[str | None, typer.Option("--from", help="First stage to run.")] = None,
    to_stage: Annotated[str | None, typer.Option("--to", help="Last stage to run.")] = None,
    resume: ResumeOpt = False,
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            help="Run once per seed, e.g. 0,1,2, into sibling workdirs <workdir>-seed<k>; "
            "stages that do not depend on run.seed are copied from the first seed's workdir.",
        ),
    ] = None,
) -> None:
    """Run the pipeline end to end (or the range --from..--to), for one seed or several (--seeds)."""
    if seeds is None:
        loaded, folder = open_spec(spec, set, workdir)
        with artifacts.workdir_lock(folder):  # held across all stages: no other fedsoda process may swap folders in between
            _run_stages(loaded, folder, from_stage, to_stage, force, resume)
        return
    values = parse_seeds(seeds)
    _, base = open_spec(spec, set, workdir)
    first: Path | None = None
    folders, reused_by_seed = [], {}
    for seed in values:
        # the seed override comes last, so it wins over a --set run.seed=...
        loaded, _ = open_spec(spec, [*(set or []), f"{SEED_KEY}={seed}"], workdir)
        folder = seed_workdir(base, seed)
        folders.append(folder)
        reused: list[str] = []
        with artifacts.workdir_lock(folder):
            if first is not None:
                reused = reuse_seed_free_stages(
                    loaded, first, folder, _select(pipeline.stages_for(loaded), None, to_stage), force
                )
                reused_by_seed[seed] = reused
            _run_stages(
                loaded, folder, from_stage, to_stage, force, resume, reused=frozenset(reused)
            )  # `set` is the --set option here
        first = first or folder
    for seed, reused in reused_by_seed.items():
        assert first is not None  # seeds after the first reuse from it
        console.print(f"seed {seed}: reused from {escape(first.name)}: {', '.join(reused) or 'nothing'}", highlight=False)
    console.print("compare the seeds: fedsoda report " + " ".join(escape(str(f)) for f in folders), highlight=False)


def parse_seeds(text: str) -> list[int]:
    """ "0,1,2" -> [0, 1, 2]; a SpecError naming the bad part otherwise."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise SpecError(f"--seeds {text!r}: give non-negative integers separated by commas, e.g. --seeds 0,1,2")
    values = [int(p) for p in parts]
    if len(set(values)) != len(values):
        raise SpecError(f"--seeds {text!r}: a seed is listed twice; each seed gets its own workdir, list it once")
    return values


def seed_workdir(base: Path, seed: int) -> Path:
    return base.parent / f"{base.name}-seed{seed}"


def reuse_seed_free_stages(spec, source: Path, target: Path, stages, force: bool = False) -> list[str]:
    """Copy into `target` each stage of `stages` that reads neither run.seed nor a stage that does,
    from `source` where it is done there; return the names copied. A stage already done in `target`
    is kept, unless `force` (the source was just rerun, so the copy is the fresh output)."""
    seed_free: set[str] = set()
    copied: list[str] = []
    source_state = {s.stage: s.state for s in pipeline.status(spec, source)}
    for stage in stages:
        if SEED_KEY in stage.sections or not all(name in seed_free for name in stage.inputs):
            continue
        seed_free.add(stage.name)
        if source_state.get(stage.name) != "done":
            continue
        if not force and _state(spec, target, stage.name) == "done":
            continue
        artifacts.verify(source, artifacts.require_manifest(source, stage.name))  # never spread a damaged output
        _copy_stage(source, target, stage.name)
        if _state(spec, target, stage.name) != "done":
            raise ArtifactError(
                f"{target / stage.name}: copied from {source / stage.name} but not up to date there; "
                f"rerun without --seeds in {target}, or remove it"
            )
        console.print(f"[cyan]{stage.name}[/]: reused from {escape(str(source))} (does not depend on run.seed)", highlight=False)
        copied.append(stage.name)
    if copied:
        pipeline.record_spec(spec, target)  # the workdir holds this seed's artifacts even if no stage runs in it
    return copied


def _state(spec, workdir: Path, stage: str) -> str:
    return {s.stage: s.state for s in pipeline.status(spec, workdir)}[stage]


def _copy_stage(source: Path, target: Path, stage: str) -> None:
    """Copy a stage folder through the artifact store's own writer (scratch folder, one rename), with
    the source manifest's spec hash, inputs and metrics: the outputs are the same bytes, so the digest
    is the same and the copied stages after it stay done. Its wall time is the copy's, what it cost here."""
    manifest = artifacts.require_manifest(source, stage)
    folder = artifacts.stage_dir(source, stage)
    with artifacts.write_stage(target, stage, manifest.spec_hash, dict(manifest.inputs), manifest.spec_keys) as writer:
        shutil.copytree(
            folder,
            writer.path,
            dirs_exist_ok=True,
            ignore=lambda at, names: [artifacts.MANIFEST] if Path(at) == folder else [],  # the writer writes its own
            copy_function=_link_or_copy,
        )
        writer.manifest.metrics = manifest.metrics


def _link_or_copy(source: str, target: str) -> None:
    """A hard link where the filesystem allows one, else a copy: a seed-free stage of a large model holds
    float checkpoints of its whole size, and every seed would carry them again. Sharing the inode is
    safe because fedsoda never writes into a finished stage folder; a rerun swaps a new folder in."""
    import os

    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _run_stages(
    loaded, folder: Path, from_stage, to_stage, force: bool, resume: bool, reused: frozenset[str] = frozenset()
) -> None:
    stages = _select(pipeline.stages_for(loaded), from_stage, to_stage)
    console.print(
        f"[bold]fedsoda run[/] {escape(loaded.run.name)} ({loaded.run.method}, seed {loaded.run.seed}) -> {escape(str(folder))}",
        highlight=False,
    )
    for stage in stages:
        if stage.name in reused:  # copied from the first seed just now, --force included
            continue
        state = {s.stage: s for s in pipeline.status(loaded, folder)}[stage.name]
        if state.state == "done" and not force:
            damage = _damage(folder, stage.name)
            if damage is None:
                console.print(f"[green]{stage.name}[/]: up to date, skipped")
                continue
            console.print(f"[yellow]{stage.name}[/]: outputs modified or corrupt ({escape(damage)}), rerunning", highlight=False)
        if state.state == "stale":
            console.print(f"[yellow]{stage.name}[/]: stale ({escape(state.reason)}), rerunning", highlight=False)
        options = {"resume": resume} if stage.name == "federate" else {}
        pipeline.execute(loaded, folder, stage, console, **options)


def _damage(workdir, stage: str) -> str | None:
    """Why a done stage's files no longer match its manifest (a file changed, truncated or gone), or None.
    Status compares only hashes of specs and inputs; before skipping a stage, its outputs are hashed too."""
    try:
        artifacts.verify(workdir, artifacts.require_manifest(workdir, stage))
    except ArtifactError as exc:
        return str(exc).split(";")[0]
    return None


def _select(stages, first: str | None, last: str | None):
    names = [s.name for s in stages]
    for option, value in (("--from", first), ("--to", last)):
        if value is not None and value not in names:
            raise SpecError(f"{option} {value!r}: not a stage of this method; choose one of {', '.join(names)}")
    start = names.index(first) if first else 0
    end = names.index(last) if last else len(names) - 1
    if start > end:
        raise SpecError(f"--from {first} comes after --to {last}; the order is {', '.join(names)}")
    return stages[start : end + 1]
