"""The reliability suite's shared ground: a tiny spec, one complete run of it made once per session
(the template workdir), a fresh copy of that run per test, and the checks every failure must pass.

Every bad-input case asserts the same contract: a non-zero exit with the error kind's code, one line
on stderr that starts with "error:", names what is wrong and says what to do, no traceback, and the
run's existing artifacts byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from fedsoda_cli.cli.app import app

REPO = Path(__file__).resolve().parents[2]

# Every stage on the tiny random llama, sized to take seconds: 6 layers, one pruned; 2 clients,
# 1 worker process, 3 rounds of 4 local steps (long enough to be interrupted mid-round).
SPEC = """\
# fedsoda run spec.toml --workdir DIR   (the reliability suite's template run)
plugins = ["reliability_plugins.py"]

[run]
name = "reliability"
seed = 0
threads = 1
workdir = "work"

[model]
name = "tiny-random-llama"

[public_data]
sequences = 4
seq_len = 32
heldout_sequences = 2

[profile]
max_span = 2

[prune]
group_size = 1
groups = 1

[align]
steps = 1
batch_size = 2

[realign]
steps = 1

[lora]
r = 2
alpha = 4

[task]
name = "sst2"
train_examples = 16
eval_examples = 8
max_len = 48

[federate]
clients = 2
clients_per_round = 2
rounds = 3
workers = 1
local_steps = 4
batch_size = 2
realign_every = 0
task_timeout_s = 300

[eval]
batch_size = 8
"""

# Plugins that break their contracts, registered under names no other test uses. The template spec
# lists this file, so the `plugins` key (part of the prune and federate spec hashes) never changes.
PLUGINS = '''\
"""Broken plugins for the reliability suite: each breaks the contract in one way."""
from fedsoda_cli.plugins import Aggregator, Pruner, aggregators, pruners


@pruners.register("reliability-raises")
class Raises(Pruner):
    def select(self, profile, config):
        raise ValueError("select exploded")


@pruners.register("reliability-not-a-list")
class NotAList(Pruner):
    def select(self, profile, config):
        return "layer three"


@pruners.register("reliability-overlapping")
class Overlapping(Pruner):
    def select(self, profile, config):
        return [[2, 3], [3]]


@aggregators.register("reliability-wrong-shape")
class WrongShape(Aggregator):
    def aggregate(self, round, global_adapter, updates):
        return {name: tensor[:1] for name, tensor in global_adapter.items()}
'''

STAGES = ("profile", "prune", "align", "quantize", "federate", "eval")
EXIT = {"runtime": 1, "spec": 2, "artifact": 3, "plugin": 4, "data": 5, "model": 6}  # README, "For CI pipelines"

runner = CliRunner()


@pytest.fixture(scope="session")
def spec_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("spec")
    (folder / "reliability_plugins.py").write_text(PLUGINS)
    path = folder / "spec.toml"
    path.write_text(SPEC)
    return path


@pytest.fixture(scope="session")
def template(tmp_path_factory, spec_path) -> Path:
    """A workdir holding every stage of the tiny spec, complete: made once, never modified."""
    workdir = tmp_path_factory.mktemp("template") / "run"
    result = fedsoda("run", spec_path, "--workdir", workdir)
    assert result.exit_code == 0, result.output
    return workdir


@pytest.fixture
def workdir(template, tmp_path) -> Path:
    """A private copy of the complete template run."""
    copy = tmp_path / "run"
    shutil.copytree(template, copy, symlinks=True)
    return copy


def fedsoda(*args) -> Result:
    """The fedsoda CLI in this process (Typer's runner): exit code, stdout, stderr."""
    return runner.invoke(app, [str(a) for a in args])


def fedsoda_process(*args, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """The fedsoda CLI as a real process (`python -m fedsoda_cli ...`), the way CI runs it."""
    return subprocess.run(
        [sys.executable, "-m", "fedsoda_cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        **popen,
    )


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def assert_one_line_error(exit_code: int, stderr: str, expected_code: int, *needles: str) -> str:
    """The failure contract: the expected exit code, exactly one stderr line "error: ..." holding
    every needle (what is wrong, where, how to fix), and no traceback. Returns the line."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in: {line}"
    assert exit_code == expected_code, f"exit code {exit_code}, expected {expected_code}: {line}"
    return line


def assert_fails(result, kind: str, *needles: str) -> str:
    """`assert_one_line_error` for an in-process CLI result; `kind` is a key of EXIT."""
    return assert_one_line_error(result.exit_code, result.stderr, EXIT[kind], *needles)


def snapshot(workdir: Path) -> dict[str, str]:
    """relative path -> sha256 of every file the run holds: stage folders (manifests included),
    spec.json and round checkpoints. Scratch space (.incomplete/, .retired/) must be empty and
    is checked by `assert_no_scratch_left`."""
    files = {}
    for path in sorted(workdir.rglob("*")):
        rel = path.relative_to(workdir)
        if path.is_file() and not rel.parts[0].startswith("."):
            files[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def assert_no_scratch_left(workdir: Path) -> None:
    """A failed stage removed its scratch folder, and no half-swapped output waits in .retired/."""
    for scratch in (".incomplete", ".retired"):
        left = list((workdir / scratch).glob("*")) if (workdir / scratch).is_dir() else []
        assert not left, f"left behind in {scratch}/: {left}"


def manifest(workdir: Path, stage: str) -> dict:
    return json.loads((workdir / stage / "manifest.json").read_text())


def stage_states(spec: Path, workdir: Path, *overrides: str) -> dict[str, str]:
    sets = [arg for override in overrides for arg in ("--set", override)]
    result = fedsoda("status", spec, "--workdir", workdir, "--json", *sets)
    assert result.exit_code == 0, result.output
    return {s["stage"]: s["state"] for s in json.loads(result.stdout)}
