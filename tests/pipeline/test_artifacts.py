"""Stage folders: manifests, integrity checks, atomic replacement, and recovery after a kill."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedsoda_cli import artifacts
from fedsoda_cli.errors import ArtifactError


def write_output(workdir: Path, content: str, stage: str = "profile") -> artifacts.Manifest:
    with artifacts.write_stage(workdir, stage, "hash-a", {"up": "digest"}) as writer:
        (writer.path / "table.csv").write_text(content)
        (writer.path / "sub").mkdir()
        (writer.path / "sub" / "x.bin").write_bytes(b"\x00" * 10)
        writer.manifest.metrics = {"score": 1.5}
    return artifacts.read_manifest(workdir, stage)


def test_manifest_lists_every_output_with_size_and_hash(tmp_path):
    manifest = write_output(tmp_path, "a,b\n")
    assert set(manifest.outputs) == {"table.csv", "sub/x.bin"}
    assert manifest.outputs["table.csv"]["bytes"] == 4
    assert manifest.outputs["table.csv"]["sha256"] == artifacts.sha256_file(tmp_path / "profile" / "table.csv")
    assert manifest.metrics == {"score": 1.5} and manifest.inputs == {"up": "digest"}
    assert manifest.wall_time_s >= 0 and manifest.peak_memory_mb > 0
    artifacts.verify(tmp_path, manifest)


def test_digest_changes_with_content(tmp_path):
    first = write_output(tmp_path, "one").digest()
    assert write_output(tmp_path, "two").digest() != first
    assert write_output(tmp_path, "one").digest() == first


def test_tampered_output_is_detected(tmp_path):
    manifest = write_output(tmp_path, "a,b\n")
    (tmp_path / "profile" / "table.csv").write_text("a,c\n")
    with pytest.raises(ArtifactError, match="table.csv.*no longer matches"):
        artifacts.verify(tmp_path, manifest)
    (tmp_path / "profile" / "table.csv").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        artifacts.verify(tmp_path, manifest)


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    write_output(tmp_path, "x")
    (tmp_path / "profile" / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        artifacts.read_manifest(tmp_path, "profile")


def test_a_failing_stage_leaves_the_previous_output(tmp_path):
    write_output(tmp_path, "good")
    with pytest.raises(RuntimeError):
        with artifacts.write_stage(tmp_path, "profile", "hash-b", {}) as writer:
            (writer.path / "table.csv").write_text("half")
            raise RuntimeError("stage crashed")
    assert (tmp_path / "profile" / "table.csv").read_text() == "good"
    assert artifacts.read_manifest(tmp_path, "profile").spec_hash == "hash-a"


def test_paths_outside_the_workdir_are_refused(tmp_path):
    with pytest.raises(ArtifactError, match="outside the workdir"):
        artifacts.inside(tmp_path, Path("../elsewhere"))
    with pytest.raises(ArtifactError, match="outside the workdir"):
        artifacts.inside(tmp_path, Path("/etc/passwd"))
    manifest = write_output(tmp_path, "x")
    manifest.outputs["../../evil"] = {"bytes": 1, "sha256": "0"}
    with pytest.raises(ArtifactError, match="outside"):
        artifacts.verify(tmp_path, manifest)


def test_interrupted_swap_is_healed(tmp_path):
    write_output(tmp_path, "old")
    # A crash right after the old output was retired and before the new one was renamed in.
    retired = tmp_path / ".retired" / "profile-deadbeef"
    retired.parent.mkdir()
    os.rename(tmp_path / "profile", retired)
    manifest = artifacts.read_manifest(tmp_path, "profile")
    assert manifest is not None and (tmp_path / "profile" / "table.csv").read_text() == "old"


def test_sigkill_during_write_keeps_the_old_output(tmp_path):
    write_output(tmp_path, "good")
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from fedsoda_cli import artifacts
        with artifacts.write_stage(Path({str(tmp_path)!r}), "profile", "hash-new", {{}}) as writer:
            with open(writer.path / "table.csv", "w") as handle:
                handle.write("partial")
                handle.flush()
                print("writing", flush=True)
                time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    assert (tmp_path / "profile" / "table.csv").read_text() == "good"
    manifest = artifacts.read_manifest(tmp_path, "profile")
    assert manifest.spec_hash == "hash-a"
    artifacts.verify(tmp_path, manifest)


def test_unwritable_workdir_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere; covered by the disk-full test")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ArtifactError, match="not writable"):
        with artifacts.write_stage(locked, "profile", "h", {}):
            pass


def test_write_json_atomic_replaces_whole_file(tmp_path):
    target = tmp_path / "a.json"
    artifacts.write_json_atomic(target, {"v": 1})
    artifacts.write_json_atomic(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
