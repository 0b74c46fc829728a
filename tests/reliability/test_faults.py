"""Faults during a run, each with the real `python -m fedsoda_cli` process: a client worker killed
mid-round, the whole federate run killed between and during rounds then resumed, Ctrl-C, a full
disk, and a workdir that cannot be written."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedsoda_cli import artifacts

from .conftest import (
    REPO,
    STAGES,
    assert_fails,
    assert_no_scratch_left,
    assert_one_line_error,
    child_env,
    fedsoda,
    fedsoda_process,
    snapshot,
    stage_states,
)

CHECKPOINTS = "federate.checkpoints"


def start(tmp_path: Path, *args) -> subprocess.Popen:
    """The CLI as a process in its own process group (as a shell runs a job), output to files."""
    out, err = (open(tmp_path / name, "w") for name in ("stdout.txt", "stderr.txt"))
    # SIGINT as a terminal job has it: a test run started in the background (`pytest &` from a
    # script) ignores SIGINT, and a child inherits an ignored signal, which would hide what Ctrl-C does.
    return subprocess.Popen(
        [sys.executable, "-m", "fedsoda_cli", *map(str, args)],
        cwd=REPO,
        env=child_env(),
        stdout=out,
        stderr=err,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(path: Path, run: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert run.poll() is None, f"the run ended (exit {run.returncode}) before {path.name} appeared"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)


def workers_of(pid: int) -> list[psutil.Process]:
    """The client worker processes (spawned by multiprocess) under `pid`."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def round_digests(workdir: Path) -> list[tuple]:
    lines = (workdir / "federate" / "metrics.jsonl").read_text().splitlines()
    return [(x["round"], x["clients"], x["updated"], x["global_digest"]) for x in map(json.loads, lines)]


def stage_files(workdir: Path) -> dict[str, str]:
    return {rel: digest for rel, digest in snapshot(workdir).items() if not rel.startswith(CHECKPOINTS)}


@pytest.mark.timeout(600)
def test_a_client_worker_killed_mid_round_the_run_completes(spec_path, template, workdir, tmp_path):
    run = start(tmp_path, "federate", spec_path, "--workdir", workdir)
    try:
        wait_for(workdir / CHECKPOINTS / "round-0001" / "state.json", run)
        (worker,) = workers_of(run.pid)
        time.sleep(0.1)
        worker.kill()  # round 2 is under way: its task goes to a replacement worker
        assert run.wait(timeout=300) == 0, (tmp_path / "stderr.txt").read_text()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    stdout = (tmp_path / "stdout.txt").read_text()
    assert f"client worker 0 (pid {worker.pid}) died (killed by SIGKILL); starting a replacement" in " ".join(stdout.split())
    summary = json.loads((workdir / "federate" / "summary.json").read_text())
    assert summary["worker_processes_started"] == 2
    # Every round got both updates, and the result is the uninterrupted run's, bit for bit.
    assert round_digests(workdir) == round_digests(template)
    assert (workdir / "federate" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        template / "federate" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert not worker.is_running()


@pytest.mark.timeout(600)
def test_sigkill_of_the_whole_run_then_resume(spec_path, template, workdir, tmp_path):
    """Killed between rounds 1 and 2 (the server alone: its workers die with it), resumed, killed
    during round 3 (the whole process group), resumed again: the same adapter, round by round, as
    the uninterrupted run."""
    for folder in ("federate", "eval", CHECKPOINTS):
        shutil.rmtree(workdir / folder)
    checkpoints = workdir / CHECKPOINTS

    run = start(tmp_path, "federate", spec_path, "--workdir", workdir)
    wait_for(checkpoints / "round-0001" / "state.json", run)
    workers = workers_of(run.pid)
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert workers and not alive, f"workers outlived the killed server: {alive}"
    assert not (checkpoints / "round-0002").exists() and not (workdir / "federate").exists()

    run = start(tmp_path, "federate", spec_path, "--workdir", workdir, "--resume")
    wait_for(checkpoints / "round-0002" / "state.json", run)
    time.sleep(0.05)  # round 3 has been handed out and is being trained
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    assert not (checkpoints / "round-0003").exists() and not (workdir / "federate").exists()

    resumed = fedsoda("federate", spec_path, "--workdir", workdir, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((workdir / "federate" / "summary.json").read_text())["resumed_after"] == 2
    assert round_digests(workdir) == round_digests(template)
    for name in ("adapter/adapter_model.safetensors", "partition.json"):
        assert (workdir / "federate" / name).read_bytes() == (template / "federate" / name).read_bytes()


def test_resume_refuses_checkpoints_of_another_spec(spec_path, workdir):
    before = snapshot(workdir)
    result = fedsoda("federate", spec_path, "--workdir", workdir, "--resume", "--set", "federate.lr=0.02")
    assert_fails(
        result, "artifact", f"checkpoint {workdir / CHECKPOINTS}", "came from a different spec", "rerun without --resume"
    )
    assert snapshot(workdir) == before


@pytest.mark.timeout(600)
def test_ctrl_c_ends_every_worker_and_keeps_finished_work(spec_path, workdir, tmp_path):
    before = stage_files(workdir)
    # Many rounds, so that the run is still mid-federation when Ctrl-C comes, however slowly this
    # process gets to send it (on a loaded machine the 3 rounds of the spec were over first).
    run = start(tmp_path, "federate", spec_path, "--workdir", workdir, "--set", "federate.rounds=40")
    try:
        wait_for(workdir / CHECKPOINTS / "round-0001" / "state.json", run)
        family = psutil.Process(run.pid).children(recursive=True)
        assert workers_of(run.pid)
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: SIGINT to the whole foreground group
        code = run.wait(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert_one_line_error(
        code, (tmp_path / "stderr.txt").read_text(), 130, "interrupted", "round checkpoints are kept", "--resume"
    )
    # The process table: none of the run's processes is left, and none was re-parented away.
    _, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, f"left running after Ctrl-C: {[(p.pid, p.cmdline()) for p in alive]}"
    pids = {run.pid, *(p.pid for p in family)}
    strays = [p for p in psutil.process_iter(["ppid"]) if p.info["ppid"] in pids]
    assert not strays, strays
    assert stage_files(workdir) == before  # the earlier federate output is untouched
    assert (workdir / CHECKPOINTS / "round-0001" / "state.json").is_file()  # finished rounds are kept
    assert_no_scratch_left(workdir)


@pytest.mark.timeout(300)
def test_disk_full_during_a_stage_write(spec_path, workdir):
    """A 1 MiB file-size limit makes the sub-LLM checkpoint write fail as a full disk would (EFBIG
    instead of ENOSPC; Python ignores SIGXFSZ, so the write raises)."""
    before = snapshot(workdir)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    done = fedsoda_process("prune", spec_path, "--workdir", workdir, preexec_fn=small_files)
    assert_one_line_error(
        done.returncode,
        done.stderr,
        1,
        "a file in the workdir: File too large; free disk space",
        "choose a writable --workdir",
        "earlier outputs are intact",
    )
    assert snapshot(workdir) == before
    assert_no_scratch_left(workdir)
    assert stage_states(spec_path, workdir) == dict.fromkeys(STAGES, "done")
    artifacts.verify(workdir, artifacts.read_manifest(workdir, "prune"))


def unwritable_workdirs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return {
        "a file": (blocker, "the workdir is a file, not a folder"),
        "below a file": (blocker / "run", "cannot create the workdir (Not a directory"),
        "in /proc": (Path("/proc/fedsoda-reliability/run"), "cannot create the workdir (No such file or directory"),
    }


@pytest.mark.parametrize("case", ["a file", "below a file", "in /proc"])
def test_unwritable_workdir(case, spec_path, tmp_path):
    """As root, permissions do not stop writes, so the workdir is made impossible instead."""
    path, needle = unwritable_workdirs(tmp_path)[case]
    result = fedsoda("profile", spec_path, "--workdir", path)
    assert_fails(result, "artifact", str(path), needle, "choose a writable folder with --workdir or run.workdir")
    assert (tmp_path / "a-file").read_text() == "not a folder"
