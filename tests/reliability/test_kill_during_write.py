"""SIGKILL during any stage's write: the previous good output stays intact (and is put back if the
kill came mid-swap), nothing incomplete ever sits at a stage's path, and the next run redoes the stage.

Each stage is killed by a real `python -m fedsoda_cli` process at one moment of its write (see
killpoint.py); together the six cover every moment. The killed run used a changed spec, so the
stage it was redoing is stale for that spec and done for the original one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fedsoda_cli import artifacts

from .conftest import REPO, STAGES, child_env, fedsoda, manifest, snapshot, stage_states
from .killpoint import MARKER

CASES = [
    # stage, moment of the kill, the changed key of the killed run (and of the run that redoes it)
    ("profile", "swapping", "profile.batch_size=2"),
    ("prune", "written", "prune.protect_last=false"),
    ("align", "computing", "align.lr=0.0005"),
    # align aligns for the client format, so every quantize key makes align stale too: quantize is
    # killed while it redoes its output for the same spec (a single-stage command always reruns)
    ("quantize", "sealed", None),
    ("federate", "computing", "federate.lr=0.001"),
    ("eval", "swapping", "eval.perplexity=false"),  # an eval-only key: eval.batch_size is federate's input too
]


def without_checkpoints(files: dict[str, str]) -> dict[str, str]:
    """Round checkpoints are the killed federate run's progress, kept on purpose for --resume."""
    return {rel: digest for rel, digest in files.items() if not rel.startswith("federate.checkpoints/")}


def kill_at(point: str, args: list[str], timeout: float = 240) -> None:
    """Start the CLI under killpoint, wait for it to announce `point`, SIGKILL its whole process group."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.killpoint", point, *map(str, args)],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        for line in child.stdout:
            if line.strip() == f"{MARKER} {point}":
                break
            assert time.monotonic() < deadline, f"no {point} after {timeout} s"
        else:
            pytest.fail(f"the run ended (exit {child.wait()}) before reaching {point}")
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage, point, override", CASES, ids=[f"{s}-{p}" for s, p, _ in CASES])
def test_sigkill_during_a_stage_write(stage, point, override, spec_path, workdir):
    before = without_checkpoints(snapshot(workdir))
    old = manifest(workdir, stage)

    changed = ["--set", override] if override else []
    kill_at(point, [stage, spec_path, "--workdir", workdir, *changed])

    if point == "swapping":  # killed in the one instant the stage folder is absent: the next command heals it
        assert not (workdir / stage).exists()
    # The previous output is what every command sees: complete, intact, current for the original spec.
    assert stage_states(spec_path, workdir) == dict.fromkeys(STAGES, "done")
    if override:
        assert stage_states(spec_path, workdir, override)[stage] == "stale"
    assert without_checkpoints(snapshot(workdir)) == before
    assert manifest(workdir, stage) == old
    for name in STAGES:
        artifacts.verify(workdir, artifacts.read_manifest(workdir, name))
    assert not any((workdir / ".retired").glob("*"))  # the retired output went back into place
    (scratch,) = (workdir / ".incomplete").glob(f"{stage}-*")  # the killed run's work: never read from there
    assert (scratch / "manifest.json").exists() == (point in ("sealed", "swapping"))

    if stage == "federate":
        return  # a federate run redone after a kill, from its round checkpoints: test_faults.py::test_sigkill_of_the_whole_run_then_resume
    # The next run redoes the stage.
    redo = fedsoda(stage, spec_path, "--workdir", workdir, *changed)
    assert redo.exit_code == 0, redo.output
    if override:
        assert manifest(workdir, stage)["spec_hash"] != old["spec_hash"]
    assert stage_states(spec_path, workdir, *([override] if override else []))[stage] == "done"
    artifacts.verify(workdir, artifacts.read_manifest(workdir, stage))
    assert not any((workdir / ".incomplete").iterdir())  # the killed run's scratch folder is gone too
