"""Stage folders on disk: atomic writes, manifests, integrity checks and staleness.

Each stage owns `<workdir>/<stage>/`. A stage writes into a private temporary folder inside the
workdir; only when every file and the manifest are complete is the folder swapped into place, so an
interrupted stage leaves the previous good output untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedsoda_cli import __version__
from fedsoda_cli.errors import ArtifactError

MANIFEST = "manifest.json"
_SCRATCH = ".incomplete"
_RETIRED = ".retired"
LOCK = ".fedsoda.lock"


@dataclass
class Manifest:
    """What a stage produced, from what, and how it went."""

    stage: str
    spec_hash: str
    inputs: dict[str, str] = field(default_factory=dict)  # input stage -> its manifest digest
    # spec key -> a short hash of its value, so a stale stage can name the keys that changed; not part
    # of digest() (spec_hash already is), and empty in manifests older than it
    spec_keys: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # relpath -> {bytes, sha256}
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    peak_memory_mb: float = 0.0
    fedsoda_version: str = __version__
    created: str = ""

    def digest(self) -> str:
        """Identity of this output: changes whenever any output file or input changes."""
        blob = json.dumps(
            {"stage": self.stage, "spec": self.spec_hash, "inputs": self.inputs, "outputs": self.outputs}, sort_keys=True
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def stage_dir(workdir: Path, stage: str) -> Path:
    """The folder of a stage's current output (it may not exist yet)."""
    return inside(workdir, workdir / stage)


def inside(root: Path, path: Path) -> Path:
    """`path` resolved, refusing anything that escapes `root` (`..`, absolute paths, links out)."""
    root = root.resolve()
    resolved = (root / path).resolve()
    if resolved != root and root not in resolved.parents:
        raise ArtifactError(f"{path}: refers outside the workdir {root}; artifact paths must stay inside it")
    return resolved


@contextlib.contextmanager
def write_stage(
    workdir: Path, stage: str, spec_hash: str, inputs: dict[str, str], spec_keys: dict[str, str] | None = None
) -> Iterator[StageWriter]:
    """Yield a writer whose `.path` is a scratch folder; on clean exit it becomes `<workdir>/<stage>`."""
    ensure_workdir(workdir)
    check_replaceable(workdir, stage)
    _remove_abandoned_scratch(workdir, stage)
    scratch = workdir / _SCRATCH / f"{stage}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    scratch.mkdir(parents=True)
    writer = StageWriter(scratch, Manifest(stage=stage, spec_hash=spec_hash, inputs=inputs, spec_keys=dict(spec_keys or {})))
    started = time.perf_counter()
    try:
        yield writer
        writer.manifest.wall_time_s = round(time.perf_counter() - started, 3)
        writer.manifest.peak_memory_mb = round(peak_memory_mb(), 1)
        _finish(writer, workdir / stage)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _remove_abandoned_scratch(workdir: Path, stage: str) -> None:
    """Delete scratch folders of `stage` whose writer process is gone (killed mid-stage: its
    `finally` never ran), so a killed stage does not keep a model's worth of disk forever."""
    for folder in (workdir / _SCRATCH).glob(f"{stage}-*-*"):
        pid = folder.name[len(stage) + 1 :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@dataclass
class StageWriter:
    path: Path
    manifest: Manifest


def _finish(writer: StageWriter, target: Path) -> None:
    manifest = writer.manifest
    manifest.outputs = {rel: info for rel, info in _describe_files(writer.path)}
    manifest.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(writer.path / MANIFEST, asdict(manifest))
    replace_folder(writer.path, target, retired_in=target.parent / _RETIRED)


def check_replaceable(workdir: Path, stage: str) -> None:
    """An ArtifactError unless `<workdir>/<stage>` is absent, an empty folder, or a folder holding
    this stage's own manifest: fedsoda only ever replaces what it wrote."""
    recover(workdir, stage)
    target = workdir / stage
    how = "move it out of the way, or choose another --workdir"
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ArtifactError(
            f"{target}: a file or link sits where the '{stage}' stage writes its folder, and fedsoda replaces only folders it wrote; {how}"
        )
    if not target.exists() or not any(target.iterdir()):
        return
    if not _owned_by(target, stage):
        raise ArtifactError(f"{target}: {_foreign(stage)}")


def _foreign(stage: str) -> str:
    return (
        f"this folder has no fedsoda '{stage}' manifest, and fedsoda replaces only folders it wrote; "
        "move it out of the way, or choose another --workdir"
    )


def _owned_by(folder: Path, stage: str) -> bool:
    """Whether `folder` carries a manifest of `stage`. An unreadable manifest.json counts as ours: a
    damaged stage output must stay replaceable by rerunning the stage (its errors say so), and a
    user's own manifest.json (a web app's, say) is valid JSON of another shape."""
    data = _manifest_data(folder)
    return data is _UNREADABLE or (isinstance(data, dict) and data.get("stage") == stage and "spec_hash" in data)


def is_stage_folder(folder: Path) -> bool:
    """Whether `folder` looks like any run's stage output (its manifest.json is fedsoda's)."""
    data = _manifest_data(folder)
    return data is _UNREADABLE or (isinstance(data, dict) and isinstance(data.get("stage"), str) and "spec_hash" in data)


_UNREADABLE = object()


def _manifest_data(folder: Path) -> Any:
    """The parsed manifest.json of `folder`, None without one, _UNREADABLE when it is not JSON."""
    path = folder / MANIFEST
    try:
        if not path.is_file():
            return None
        return json.loads(path.read_bytes())
    except OSError:
        return None
    except (ValueError, RecursionError):
        return _UNREADABLE


def replace_folder(new: Path, target: Path, *, retired_in: Path | None = None, keep_existing: bool = False) -> bool:
    """Swap the complete folder `new` in as `target` (same filesystem), the one way fedsoda publishes
    a folder: stage outputs, round checkpoints, saved models, exports and the model cache.

    The files of `new` are synced first, so a rename never publishes data that is still only in
    memory. Then `target` is renamed aside to a retired name, `new` is renamed onto `target`, and the
    retired folder is deleted. A folder cannot be renamed over a non-empty one, so the two renames
    leave one moment with no `target`; at that moment and every other, the old folder or the new one
    is complete under its name. An error at the second rename puts the old folder back at once; a
    process killed there leaves it under its retired name, which `recover_folder` renames back.

    The retired name is `<retired_in>/<name>-<hex>` when `retired_in` is given (stage outputs keep
    theirs in the workdir's .retired/), else `.<name>.retired-<hex>` beside `target`: nothing is
    shared, so concurrent swaps in one parent folder cannot trip over each other.

    With `keep_existing`, a folder already at `target` wins (a cache another process finished
    first) and False is returned. A file or link at `target` is never replaced: callers decide
    whether a folder there is theirs to replace, and fedsoda never deletes a file it did not write.
    """
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ArtifactError(
            f"{target}: a file or link is in the way of the folder fedsoda writes there; move it away or write elsewhere"
        )
    _fsync_tree(new)
    if keep_existing:
        try:
            os.rename(new, target)  # onto an empty folder at most: a non-empty one refuses
        except OSError:
            if not target.exists():
                raise
            return False
        return True
    retired = None
    if target.exists():
        retired = _retired_path(target, retired_in)
        retired.parent.mkdir(exist_ok=True)
        os.rename(target, retired)
    try:
        os.rename(new, target)
    except BaseException:
        if retired is not None and not target.exists():
            os.rename(retired, target)
        raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    return True


def _retired_path(target: Path, retired_in: Path | None) -> Path:
    tag = uuid.uuid4().hex[:8]
    if retired_in is not None:
        return retired_in / f"{target.name}-{tag}"
    return target.parent / f".{target.name}.retired-{tag}"


def recover_folder(
    target: Path, *, retired_in: Path | None = None, complete: Callable[[Path], bool] = lambda folder: True
) -> bool:
    """If `replace_folder` was killed between its two renames (no `target`, the old folder under a
    retired name), rename the newest retired folder that passes `complete` back. Returns whether one
    went back."""
    if target.exists() or target.is_symlink():
        return False
    if retired_in is not None:
        candidates = list(retired_in.glob(f"{target.name}-*")) if retired_in.is_dir() else []
    else:
        candidates = list(target.parent.glob(f".{target.name}.retired-*")) if target.parent.is_dir() else []
    for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if candidate.is_dir() and complete(candidate):
            os.rename(candidate, target)
            return True
    return False


def recover(workdir: Path, stage: str) -> None:
    """If a stage's swap was interrupted after retiring the old output, put the old output back."""
    recover_folder(workdir / stage, retired_in=workdir / _RETIRED, complete=lambda folder: (folder / MANIFEST).is_file())


def require_manifest(workdir: Path, stage: str) -> Manifest:
    """The manifest of a stage that has run (its status says so, or it was just written); an
    ArtifactError if it is gone all the same."""
    manifest = read_manifest(workdir, stage)
    if manifest is None:
        raise ArtifactError(f"{stage_dir(workdir, stage)}: no {MANIFEST}; run the '{stage}' stage (fedsoda {stage} SPEC)")
    return manifest


def read_manifest(workdir: Path, stage: str) -> Manifest | None:
    """The manifest of a stage's current output, or None when the stage has not run."""
    recover(workdir, stage)
    path = stage_dir(workdir, stage) / MANIFEST
    if not path.is_file():
        return None
    rebuild = f"rerun the '{stage}' stage with --force (fedsoda {stage} SPEC --force)"
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested past the parser's stack
        raise ArtifactError(f"{path}: corrupt manifest ({type(exc).__name__}: {str(exc)[:120]}); {rebuild}") from None
    if isinstance(data, dict) and "stage" not in data and "spec_hash" not in data:
        raise ArtifactError(f"{path.parent}: {_foreign(stage)}")  # another program's manifest.json
    problem = _manifest_problem(data)
    if problem:
        raise ArtifactError(f"{path}: corrupt manifest ({problem}); {rebuild}")
    return Manifest(**data)


# Each field's type, and for outputs each entry's; every reader of a Manifest relies on them.
_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "stage": (str,),
    "spec_hash": (str,),
    "inputs": (dict,),
    "spec_keys": (dict,),
    "outputs": (dict,),
    "metrics": (dict,),
    "wall_time_s": (int, float),
    "peak_memory_mb": (int, float),
    "fedsoda_version": (str,),
    "created": (str,),
}


def _manifest_problem(data: Any) -> str | None:
    """What makes `data` not a manifest fedsoda wrote, or None."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    for key in ("stage", "spec_hash"):
        if key not in data:
            return f"no '{key}'"
    for key, value in data.items():
        if key not in _MANIFEST_TYPES:
            return f"unknown key '{key}'"
        if not isinstance(value, _MANIFEST_TYPES[key]) or isinstance(value, bool):
            return f"'{key}' is a JSON {type(value).__name__}"
    for key, what in (("inputs", "stage names to digests"), ("spec_keys", "spec keys to hashes")):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.get(key, {}).items()):
            return f"'{key}' must map {what}"
    for rel, info in data.get("outputs", {}).items():
        if not (
            isinstance(info, dict)
            and isinstance(info.get("bytes"), int)
            and not isinstance(info["bytes"], bool)
            and isinstance(info.get("sha256"), str)
        ):
            return f"output '{rel[:80]}' has no bytes and sha256"
    return None


def verify(workdir: Path, manifest: Manifest) -> None:
    """Check every output file against the manifest's size and sha256."""
    folder = stage_dir(workdir, manifest.stage)
    for rel, info in manifest.outputs.items():
        path = inside(folder, Path(rel))
        if not path.is_file():
            raise ArtifactError(
                f"{path}: listed in the '{manifest.stage}' manifest but missing; rerun `fedsoda {manifest.stage}` with --force"
            )
        if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
            raise ArtifactError(
                f"{path}: content no longer matches the '{manifest.stage}' manifest (modified or corrupt); rerun `fedsoda {manifest.stage}` with --force"
            )


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to `path` and rename it over, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _describe_files(folder: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path.relative_to(folder).as_posix(), {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` to disk: a rename is durable before the data it names is."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def ensure_workdir(workdir: Path) -> None:
    """Create the workdir if it does not exist; an ArtifactError naming it when it cannot be a
    writable folder (a file in the way, a read-only or virtual file system, no permission)."""
    if workdir.exists() and not workdir.is_dir():
        raise ArtifactError(
            f"{workdir}: the workdir is a file, not a folder; choose a writable folder with --workdir or run.workdir"
        )
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        at = f" at {exc.filename}" if exc.filename and Path(exc.filename) != workdir else ""
        raise ArtifactError(
            f"{workdir}: cannot create the workdir ({exc.strerror}{at}); choose a writable folder with --workdir or run.workdir"
        ) from None
    if not os.access(workdir, os.W_OK):
        raise ArtifactError(f"{workdir}: workdir is not writable; choose another with --workdir or run.workdir")


# workdir (resolved) -> [open lock file descriptor, nesting depth] of the locks this process holds
_HELD: dict[Path, list[int]] = {}


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the workdir for the duration: a second fedsoda process on the same
    workdir would replace stage folders and delete round checkpoints under the first. Re-entrant
    within one process, so `fedsoda run` holds it across all stages it executes."""
    key = Path(workdir).resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    ensure_workdir(key)
    fd = _acquire(key / LOCK)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        _release(key / LOCK, fd)


def _acquire(path: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ArtifactError(
                f"{path}: cannot create the workdir lock ({exc.strerror}); choose a writable folder with --workdir or run.workdir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ArtifactError(
                f"{path.parent}: in use by another fedsoda process ({holder}); wait for it to finish, or choose another --workdir"
            ) from None
        # The holder before us unlinks the file as it lets go; a lock on that unlinked file guards nothing.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (current.st_dev, current.st_ino):
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        command = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1].isalpha() else ""
        os.write(fd, json.dumps({"pid": os.getpid(), "command": f"fedsoda {command}".strip()}).encode())
        return fd


def _holder(fd: int) -> str:
    """'pid N, fedsoda run' from the lock file, as far as its holder has written it yet."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        pid, command = int(data["pid"]), str(data.get("command", "fedsoda"))
    except (ValueError, KeyError, TypeError):
        return "pid not yet recorded"
    return f"pid {pid}, {command}"


def _release(path: Path, fd: int) -> None:
    # Unlinked while still locked, so the folder is left as it was found and nobody can lock a stale file.
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)
