"""Reading a spec file: TOML parsing, `--set` overrides, validation, and one-line error messages."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from fedsoda_cli.errors import SpecError
from fedsoda_cli.spec.schema import SECTIONS, Spec

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails  # pydantic's own dependency; only its type is needed


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> Spec:
    """Parse and validate the spec at `path`, after applying `section.key=value` overrides."""
    path = Path(path)
    text = _read_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}; fix the syntax at that line") from None
    overridden = {}
    for override in overrides:
        overridden[_apply_override(raw, override, path)] = override
    spec = validate(raw, path, text, overridden)
    spec._source = path.resolve()
    return spec


def validate(raw: dict[str, Any], path: Path, text: str = "", overridden: dict[tuple[str, ...], str] | None = None) -> Spec:
    """Turn a parsed TOML dict into a Spec, or raise a SpecError naming the first bad key (and the
    `--set` that gave it, when `overridden` maps its key path to an override)."""
    try:
        return Spec.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = _describe(errors[0], raw, path, text, overridden or {})
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise SpecError(first + more) from None


def spec_dir(spec: Spec) -> Path:
    """Folder of the spec file; relative paths in the spec are relative to it."""
    source = getattr(spec, "_source", None)
    return source.parent if source else Path.cwd()


def resolve_workdir(spec: Spec, override: str | Path | None = None) -> Path:
    """The run's artifact folder: `--workdir` if given, else run.workdir relative to the spec.
    run.name is a single folder name (RunSpec checks it), so '{name}' cannot lead out of run.workdir."""
    if override is not None:
        return _own_folder(Path(override).resolve(), f"--workdir {override}")
    workdir = Path(spec.run.workdir.replace("{name}", spec.run.name))
    return _own_folder((spec_dir(spec) / workdir).resolve(), f"run.workdir = {spec.run.workdir!r}")


def _own_folder(workdir: Path, given: str) -> Path:
    if workdir.parent == workdir:  # stage folders would land in /profile, /eval, ... beside system folders
        raise SpecError(f"{given} resolves to the filesystem root {workdir}; give the run a folder of its own")
    return workdir


def sections_hash(spec: Spec, sections: Iterable[str]) -> str:
    """A stable hash of the named sections: a stage is stale when the sections it reads change."""
    return _hash({name: _section_payload(spec, name) for name in sorted(sections)}, 16)


def key_hashes(spec: Spec, sections: Iterable[str]) -> dict[str, str]:
    """A short hash per key of the named sections ('federate.lr': ...), so that a stale stage can say
    which keys changed; `sections_hash` stays the one identity."""
    hashes: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
            return
        hashes[prefix] = _hash(value, 12)

    for name in sorted(sections):
        walk(name, _section_payload(spec, name))
    return hashes


def _hash(value: Any, length: int) -> str:
    """The one serialisation both spec hashes use, so a key's hash and its section's agree on what changed."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def _section_payload(spec: Spec, name: str) -> Any:
    """A section ('federate') or one key of it ('run.seed')."""
    value: Any = spec
    for part in name.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found; pass the path of a .toml spec (see specs/)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file; a spec is a TOML file") from None


def _apply_override(raw: dict[str, Any], override: str, path: Path) -> tuple[str, ...]:
    """Apply one `section.key=value` (the value is read as a TOML value, else taken as a string);
    returns the key path it set."""
    key_path, sep, value_text = override.partition("=")
    keys = key_path.strip().split(".")
    if not sep or not all(keys) or len(keys) < 2 and keys[0] != "plugins":
        raise SpecError(f"--set {override!r}: expected section.key=value, e.g. --set federate.rounds=3")
    if keys[0] not in SECTIONS and keys[0] != "plugins":
        raise SpecError(f"--set {override!r}: unknown section '{keys[0]}'{_suggest(keys[0], [*SECTIONS, 'plugins'])}")
    value = _parse_value(value_text.strip())
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {override!r}: '{key}' in {path} is a value, not a section")
        node = child
    node[keys[-1]] = value
    return tuple(keys)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _describe(error: ErrorDetails, raw: dict[str, Any], path: Path, text: str, overridden: dict[tuple[str, ...], str]) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    override = next((o for keys, o in overridden.items() if tuple(loc[: len(keys)]) == keys), None)
    within = [o for keys, o in overridden.items() if keys[: len(loc)] == tuple(loc)]
    if override is not None:  # the bad value came from the command line, not from the file
        prefix = f"--set {override!r}: "
    else:
        where = _line_of(text, loc)
        also = f" with --set {', '.join(repr(o) for o in within)}" if within else ""  # a check across keys of a section
        prefix = f"{path}{f':{where}' if where else ''}{also}: "
    if error["type"] == "extra_forbidden":
        choices = _known_keys(loc[:-1])
        return f"{prefix}unknown key '{key}'{_suggest(loc[-1], choices)}"
    message = error["msg"]
    if error["type"] == "value_error":
        message = message.removeprefix("Value error, ")
        return f"{prefix}{message}"
    got = _lookup(raw, loc)
    got_text = f"; got {got!r}" if got is not _MISSING else ""
    return f"{prefix}{key}: {message}{got_text}"


_MISSING = object()


def _lookup(raw: dict[str, Any], loc: list[str]) -> Any:
    node: Any = raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _known_keys(section_loc: list[str]) -> list[str]:
    if not section_loc:
        return list(Spec.model_fields)
    model = SECTIONS.get(section_loc[0])
    return list(model.model_fields) if model else []


def _suggest(word: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=2, cutoff=0.5)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"; allowed: {', '.join(choices)}" if choices else ""


def _line_of(text: str, loc: list[str]) -> int | None:
    """Best-effort line number of a key, since tomllib does not report positions."""
    if not text or not loc:
        return None
    section, key = (loc[0], loc[1]) if len(loc) > 1 else (None, loc[0])
    in_section = section is None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.fullmatch(r"\[\s*([\w.-]+)\s*\]\s*(#.*)?", stripped)
        if header:
            if section is None and header.group(1) == key:
                return number  # the error is about a whole section
            in_section = header.group(1) == section
        elif in_section and re.match(rf"{re.escape(key)}\s*=", stripped):
            return number
    return None
