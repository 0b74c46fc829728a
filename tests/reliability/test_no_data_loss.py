"""Nothing lost, whatever the input: fedsoda replaces only folders that carry its own manifest or
export marker, keeps run names inside the workdir, refuses a round checkpoint that changed on disk,
and lets only one command at a time work on a workdir. Every refusal is exit 3 (exit 2 for a spec
value) with one line saying how to proceed, and the user's files are byte-for-byte intact."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedsoda_cli import artifacts
from fedsoda_cli.errors import SpecError
from fedsoda_cli.export import PROVENANCE
from fedsoda_cli.spec import load_spec, resolve_workdir

from .conftest import REPO, assert_fails, child_env, fedsoda, snapshot

CHECKPOINTS = "federate.checkpoints"
ONLY_OURS = "fedsoda replaces only folders it wrote"


def tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder`, hidden ones included ('' for a file itself)."""
    if folder.is_file():
        return {"": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def user_files(folder: Path) -> Path:
    (folder / "notes").mkdir(parents=True)
    (folder / "important.txt").write_text("the only copy\n")
    (folder / "notes" / "thesis.md").write_text("# chapter 1\n")
    return folder


# --- export --out ---------------------------------------------------------------------------------

AROUND_THE_RUN = {
    "the workdir": lambda w: w,
    "a folder holding the workdir": lambda w: w.parent,
    "a stage folder": lambda w: w / "federate",
    "inside a stage folder": lambda w: w / "prune" / "merged",
    "the round checkpoints": lambda w: w / CHECKPOINTS,
}


@pytest.mark.parametrize("case", AROUND_THE_RUN)
def test_export_never_writes_over_or_into_the_run(case, spec_path, workdir):
    out = AROUND_THE_RUN[case](workdir)
    before = snapshot(workdir)
    result = fedsoda("export", spec_path, "--workdir", workdir, "--out", out)
    assert_fails(result, "artifact", str(out), "choose another --out")
    assert snapshot(workdir) == before
    assert not (workdir / "prune" / "merged").exists()


def _another_runs_stage_folder(tmp_path: Path, template: Path) -> Path:
    copy = tmp_path / "other-run"
    shutil.copytree(template, copy)
    return copy / "align"


def _a_file(tmp_path: Path, template: Path) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x00weights the user keeps\n")
    return path


NOT_OURS = {
    "a folder of user files": (lambda tmp, template: user_files(tmp / "mine"), "is not an earlier fedsoda export"),
    "another run's stage folder": (_another_runs_stage_folder, "fedsoda stage folder"),
    "an existing file": (_a_file, "exists and is not a folder"),
}


@pytest.mark.parametrize("case", NOT_OURS)
def test_export_never_replaces_what_it_did_not_write(case, spec_path, workdir, template, tmp_path):
    make, needle = NOT_OURS[case]
    out = make(tmp_path, template)
    before, run_before = tree(out), snapshot(workdir)
    result = fedsoda("export", spec_path, "--workdir", workdir, "--out", out)
    assert_fails(result, "artifact", str(out), needle, "choose another --out")
    assert tree(out) == before and snapshot(workdir) == run_before


def test_export_replaces_its_own_earlier_export(spec_path, workdir, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()  # an empty folder holds nothing to lose
    for _ in range(2):
        result = fedsoda("export", spec_path, "--workdir", workdir, "--out", out, "--dtype", "float32")
        assert result.exit_code == 0, result.output
        assert (out / PROVENANCE).is_file() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial export left beside it


# --- stage folders ----------------------------------------------------------------------------------


def _file_named_like_the_stage(work: Path) -> None:
    work.mkdir()
    (work / "profile").write_text("not a folder\n")


def _someone_elses_manifest(work: Path) -> None:
    user_files(work / "profile")
    (work / "profile" / "manifest.json").write_text(json.dumps({"name": "my web app", "icons": []}))


IN_THE_WAY = {
    "a folder of user files": (lambda work: user_files(work / "profile"), "has no fedsoda 'profile' manifest"),
    "a folder with another program's manifest.json": (_someone_elses_manifest, "has no fedsoda 'profile' manifest"),
    "a file": (_file_named_like_the_stage, "a file or link sits where the 'profile' stage writes its folder"),
}


@pytest.mark.parametrize("case", IN_THE_WAY)
def test_a_stage_never_replaces_a_folder_it_did_not_write(case, spec_path, tmp_path):
    work = tmp_path / "fresh"
    make, needle = IN_THE_WAY[case]
    make(work)
    before = tree(work)
    result = fedsoda("profile", spec_path, "--workdir", work)
    assert_fails(
        result, "artifact", str(work / "profile"), needle, ONLY_OURS, "move it out of the way, or choose another --workdir"
    )
    assert tree(work) == before  # nothing moved into .retired/, no scratch or lock left


def test_run_never_replaces_a_stage_folder_it_did_not_write(spec_path, workdir):
    shutil.rmtree(workdir / "eval")
    user_files(workdir / "eval")
    before = tree(workdir)
    result = fedsoda("run", spec_path, "--workdir", workdir)
    assert_fails(result, "artifact", str(workdir / "eval"), "has no fedsoda 'eval' manifest", ONLY_OURS)
    assert tree(workdir) == before


# --- run.name ---------------------------------------------------------------------------------------

BAD_NAMES = {
    "leaves the workdir": ("../../x", "contains a path separator"),
    "empty": ("", "is empty"),
    "a path": ("a/b", "contains a path separator"),
    "dot dot": ("..", "contains '..'"),
    "NUL": ("a\0b", "contains a NUL"),
    "too long": ("n" * 101, "is 101 characters long (at most 100)"),
}


@pytest.mark.parametrize("case", BAD_NAMES)
def test_a_run_name_that_is_not_one_folder_name_is_refused(case, spec_path):
    name, needle = BAD_NAMES[case]
    above = spec_path.parent.parent
    before = sorted(p.name for p in above.iterdir())
    result = fedsoda("profile", spec_path, "--set", f"run.name={json.dumps(name)}", "--set", "run.workdir='runs/{name}'")
    assert_fails(result, "spec", "run.name", needle, "a run name becomes a folder name")
    assert sorted(p.name for p in above.iterdir()) == before and not (spec_path.parent / "runs").exists()


@settings(max_examples=200, deadline=None)
@given(name=st.text(max_size=120))
def test_any_accepted_run_name_stays_one_folder_below_run_workdir(spec_path, name):
    try:
        spec = load_spec(spec_path, [f"run.name={json.dumps(name, ensure_ascii=False)}", "run.workdir='runs/{name}'"])
    except SpecError as exc:
        assert "run.name" in str(exc) and "\n" not in str(exc)
        return
    workdir = resolve_workdir(spec)
    assert workdir.parent == (spec_path.parent / "runs").resolve() and workdir.name == name


def test_a_workdir_at_the_filesystem_root_is_refused(spec_path):
    result = fedsoda("profile", spec_path, "--workdir", "/")
    assert_fails(result, "spec", "--workdir /", "resolves to the filesystem root", "give the run a folder of its own")


# --- round checkpoints ------------------------------------------------------------------------------


def _latest_checkpoint(workdir: Path) -> Path:
    return sorted((workdir / CHECKPOINTS).glob("round-*"))[-1]


def _same_json(old: bytes, new: bytes) -> bool:
    try:
        return json.loads(new) == json.loads(old)
    except ValueError:
        return False


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_changed_byte_in_a_round_checkpoint_stops_resume(spec_path, workdir, data):
    """Any byte of any file of the checkpoint --resume would continue from, changed in any way."""
    latest = _latest_checkpoint(workdir)
    path = data.draw(st.sampled_from(sorted(p for p in latest.rglob("*") if p.is_file())), label="file")
    original = path.read_bytes()
    offset = data.draw(st.integers(0, len(original) - 1), label="offset")
    flipped = bytearray(original)
    flipped[offset] ^= data.draw(st.integers(1, 255), label="xor")
    assume(not (path.name == "state.json" and _same_json(original, bytes(flipped))))  # only whitespace changed
    before = snapshot(workdir)
    path.write_bytes(bytes(flipped))
    try:
        result = fedsoda("federate", spec_path, "--workdir", workdir, "--resume")
        assert_fails(result, "artifact", str(latest), "rerun without --resume")
    finally:
        path.write_bytes(original)
    assert snapshot(workdir) == before


def _drop_adapter(latest: Path) -> None:
    (latest / "adapter" / "adapter_model.safetensors").unlink()


def _add_a_file(latest: Path) -> None:
    (latest / "realign").mkdir(exist_ok=True)
    (latest / "realign" / "layers.safetensors").write_bytes(b"{}")


def _truncate_state(latest: Path) -> None:
    state = latest / "state.json"
    state.write_bytes(state.read_bytes()[:40])


def _strip_the_hashes(latest: Path) -> None:
    state = json.loads((latest / "state.json").read_text())
    del state["files"], state["state_sha256"]
    (latest / "state.json").write_text(json.dumps(state))


DAMAGE = {
    "a file deleted": (_drop_adapter, "adapter_model.safetensors: listed in checkpoint"),
    "a file added": (_add_a_file, "layers.safetensors: not part of checkpoint"),
    "state.json truncated": (_truncate_state, "state.json: corrupt checkpoint state"),
    "state.json without hashes": (_strip_the_hashes, "without its integrity record"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_round_checkpoint_stops_resume(case, spec_path, workdir):
    damage, needle = DAMAGE[case]
    latest = _latest_checkpoint(workdir)
    damage(latest)
    before = snapshot(workdir)
    result = fedsoda("federate", spec_path, "--workdir", workdir, "--resume")
    assert_fails(result, "artifact", str(latest), needle, "rerun without --resume")
    assert snapshot(workdir) == before


# --- one command per workdir ------------------------------------------------------------------------

HOLD = """
import sys
from pathlib import Path
from fedsoda_cli import artifacts
with artifacts.workdir_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_command_on_a_workdir_in_use_fails_at_once(spec_path, workdir, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(workdir)],
        cwd=REPO,
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(workdir)
        for command in (["run", "--force"], ["federate", "--resume"], ["profile"], ["export", "--out", tmp_path / "merged"]):
            result = fedsoda(command[0], spec_path, "--workdir", workdir, *command[1:])
            assert_fails(
                result,
                "artifact",
                str(workdir),
                "in use by another fedsoda process",
                f"pid {holder.pid}",
                "wait for it to finish, or choose another --workdir",
            )
        assert snapshot(workdir) == before and not (tmp_path / "merged").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not (workdir / artifacts.LOCK).exists()
    result = fedsoda("run", spec_path, "--workdir", workdir)  # free again once the holder is done
    assert result.exit_code == 0, result.output


def test_the_workdir_lock_is_reentrant_within_one_process(tmp_path):
    work = tmp_path / "w"
    with artifacts.workdir_lock(work):
        with artifacts.workdir_lock(work):  # `fedsoda run` holds it, and each stage it executes takes it again
            assert (work / artifacts.LOCK).is_file()
        assert (work / artifacts.LOCK).is_file()
    assert list(work.iterdir()) == []
