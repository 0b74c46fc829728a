"""The one folder swap (artifacts.replace_folder) interrupted at each of its steps.

Every step that touches the disk is a rename or the final delete, so a process stopped at step k
is simulated by making the k-th rename and every one after it fail: nothing more happens, as after
a SIGKILL. Whatever step it stops at, the old folder or the new one must be complete under its
name, and `recover_folder` must bring a complete folder back under the target's name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fedsoda_cli import artifacts
from fedsoda_cli.errors import ArtifactError
from fedsoda_cli.federated import checkpoint as checkpoint_module

OLD = {"a.txt": "old a", "sub/b.txt": "old b"}
NEW = {"a.txt": "new a", "sub/c.txt": "new c"}


def fill(folder: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def contents(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


class Stop(OSError):
    pass


def stop_at(monkeypatch, k: int, *, then: str = "stop") -> None:
    """Make rename number k fail, and with then='stop' every later one too (the process is gone)."""
    rename, calls = os.rename, [0]

    def failing(src, dst, *args, **kwargs):
        calls[0] += 1
        if calls[0] == k or (then == "stop" and calls[0] > k):
            raise Stop(f"stopped at rename {calls[0]}")
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", failing)


@pytest.mark.parametrize("retired_in", [None, ".retired"], ids=["beside", "retired-folder"])
@pytest.mark.parametrize("then", ["stop", "continue"], ids=["killed", "one-error"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_an_interrupted_swap_leaves_old_or_new_complete(k, then, retired_in, tmp_path, monkeypatch):
    target, new = fill(tmp_path / "out", OLD), fill(tmp_path / ".scratch", NEW)
    retired = tmp_path / retired_in if retired_in else None
    stop_at(monkeypatch, k, then=then)
    try:
        artifacts.replace_folder(new, target, retired_in=retired)
        finished = True
    except Stop:
        finished = False
    monkeypatch.undo()
    if then == "continue":  # an error the process survives: it put the old folder back itself
        assert contents(target) in (OLD, NEW)
    else:  # at most the swap's two renames ran: old under the target or its retired name, new under one of its two names
        old_at = [
            p for p in (target, *tmp_path.glob(".out.retired-*"), *(tmp_path / ".retired").glob("out-*")) if contents(p) == OLD
        ]
        new_at = [p for p in (target, new) if p.is_dir() and contents(p) == NEW]
        assert old_at or new_at
    artifacts.recover_folder(target, retired_in=retired)
    assert contents(target) == NEW if finished else contents(target) in (OLD, NEW)


def test_the_delete_of_the_old_folder_interrupted_leaves_the_new_one(tmp_path, monkeypatch):
    target, new = fill(tmp_path / "out", OLD), fill(tmp_path / ".scratch", NEW)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # killed before the delete
    artifacts.replace_folder(new, target)
    assert contents(target) == NEW
    assert not artifacts.recover_folder(target)  # a target in place is never replaced by a retired folder


def test_a_swap_never_replaces_a_file_or_link(tmp_path):
    new = fill(tmp_path / ".scratch", NEW)
    (tmp_path / "file").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    for name in ("file", "link"):
        with pytest.raises(ArtifactError, match="a file or link is in the way"):
            artifacts.replace_folder(new, tmp_path / name)
    assert (tmp_path / "file").read_text() == "mine" and contents(new) == NEW


def test_keep_existing_keeps_the_folder_another_writer_finished(tmp_path):
    target, new = fill(tmp_path / "cache", OLD), fill(tmp_path / ".scratch", NEW)
    assert artifacts.replace_folder(new, target, keep_existing=True) is False
    assert contents(target) == OLD


def test_a_checkpoint_killed_mid_replacement_comes_back(tmp_path, monkeypatch):
    """The round checkpoint once did rmtree-then-rename: a kill between the two lost the round."""
    torch = pytest.importorskip("torch")
    from peft import LoraConfig

    store = checkpoint_module.CheckpointStore(tmp_path / "ckpt", {"spec_hash": "h"}, LoraConfig(r=2, target_modules=["q_proj"]))
    adapter = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(2, 4)}
    store.save(checkpoint_module.Checkpoint(round=1, adapter=adapter), "fedavg")
    # The second save of round 1 stops after its first rename: round-0001 is retired, not yet replaced.
    stop_at(monkeypatch, 2)
    with pytest.raises(Stop):
        store.save(checkpoint_module.Checkpoint(round=1, adapter={k: v * 2 for k, v in adapter.items()}), "fedavg")
    monkeypatch.undo()
    assert not (tmp_path / "ckpt" / "round-0001").exists()
    latest = store.latest()
    assert latest is not None and latest.round == 1
    assert torch.equal(next(iter(latest.adapter.values())), torch.ones(2, 4))
