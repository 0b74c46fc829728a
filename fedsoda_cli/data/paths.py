"""Where the datasets live: the data folder a run reads from, and files inside it.

Lookup order for the folder (first hit wins):
1. `data.dir` in the spec (a relative path is relative to the spec file's folder);
2. the environment variable `FEDSODA_DATA` (a relative path is relative to the working directory);
3. `../shared/data` beside the repository root (the parent folder of the `fedsoda_cli` package);
4. none: `None`, meaning "load from the Hugging Face hub through `datasets`".

A folder that is set explicitly (1 or 2) but does not exist is an error, never a silent fallback:
a typo would otherwise send the run to the network or to other data.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedsoda_cli.errors import DataError
from fedsoda_cli.spec.schema import DataSpec

ENV_VAR = "FEDSODA_DATA"

# <repo>/fedsoda_cli/data/paths.py -> <repo>
_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_shared_dir() -> Path:
    """`<repo>/../shared/data`: the project's bundled copy of the public datasets."""
    return _REPO_ROOT.parent / "shared" / "data"


def resolve_data_dir(data: DataSpec, spec_dir: Path | None) -> Path | None:
    """The data folder for a run (absolute), or None to use the Hugging Face hub.

    `spec_dir` is the spec file's folder (relative `data.dir` is resolved against it; the working
    directory when None). Raises DataError when `data.dir` or `$FEDSODA_DATA` names a missing folder.
    """
    if data.dir:
        base = spec_dir if spec_dir is not None else Path.cwd()
        return _existing_dir(_absolute(data.dir, base), f"data.dir = {data.dir!r}", "fix data.dir in the spec or remove it")
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _existing_dir(_absolute(env, Path.cwd()), f"${ENV_VAR} = {env!r}", f"fix or unset {ENV_VAR}")
    shared = default_shared_dir()
    return shared.resolve() if shared.is_dir() else None


def data_file(data_dir: Path, relpath: str) -> Path:
    """`data_dir / relpath`, checked to be an existing file; else a DataError naming the full path."""
    path = Path(data_dir) / relpath
    if not path.is_file():
        raise DataError(
            f"data file {path} not found: put {relpath} into {data_dir}, or point data.dir "
            f"(or ${ENV_VAR}) to a folder that has it (see ../shared/data/README.md for the layout)"
        )
    return path


def _absolute(raw: str, base: Path) -> Path:
    path = Path(raw).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


def _existing_dir(path: Path, origin: str, fix: str) -> Path:
    if not path.exists():
        raise DataError(f"data folder {path} (from {origin}) does not exist: {fix}")
    if not path.is_dir():
        raise DataError(f"data folder {path} (from {origin}) is a file, not a folder: {fix}")
    return path
