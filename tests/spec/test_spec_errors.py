"""Each kind of spec error gives one line naming the file, key and what is allowed."""

from pathlib import Path

import pytest

from fedsoda_cli.errors import SpecError
from fedsoda_cli.spec import load_spec, resolve_workdir, sections_hash


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_fill_every_section(tmp_path):
    spec = load_spec(write(tmp_path, "[run]\nname = 'x'\n"))
    assert spec.run.name == "x"
    assert spec.prune.strategy == "sgp" and spec.federate.aggregator == "fedavg"
    assert spec.align.alpha == 1.0 and spec.align.beta == 1.0 and spec.align.gamma == 0.0


def test_not_toml_names_file_and_line(tmp_path):
    message = error_of(write(tmp_path, "[run]\nname = \n"))
    assert "spec.toml" in message and "not valid TOML" in message and "line 2" in message


def test_missing_file(tmp_path):
    message = error_of(tmp_path / "nope.toml")
    assert "nope.toml" in message and "not found" in message


def test_unknown_key_suggests_closest(tmp_path):
    message = error_of(write(tmp_path, "[federate]\nround = 3\n"))
    assert "unknown key 'federate.round'" in message and "'rounds'" in message
    assert "spec.toml:2" in message


def test_unknown_section_suggests_closest(tmp_path):
    message = error_of(write(tmp_path, "[federat]\nrounds = 3\n"))
    assert "unknown key 'federat'" in message and "'federate'" in message


def test_wrong_type(tmp_path):
    message = error_of(write(tmp_path, "[prune]\ngroups = 'four'\n"))
    assert "prune.groups" in message and "integer" in message and "'four'" in message


@pytest.mark.parametrize(
    "text, key",
    [
        ("[federate]\nrounds = -1\n", "federate.rounds"),
        ("[align]\ntau = 0\n", "align.tau"),
        ("[federate]\ndirichlet_alpha = 0\n", "federate.dirichlet_alpha"),
        ("[run]\nmethod = 'fedfoo'\n", "run.method"),
    ],
)
def test_out_of_range(tmp_path, text, key):
    message = error_of(write(tmp_path, text))
    assert key in message and ":2:" in message


def test_contradictory_settings(tmp_path):
    message = error_of(write(tmp_path, "[federate]\nclients = 2\nclients_per_round = 5\n"))
    assert "clients_per_round (5) must be <= federate.clients (2)" in message


def test_overrides_apply_and_parse_toml_values(tmp_path):
    spec = load_spec(
        write(tmp_path, "[federate]\nrounds = 3\n"), ["federate.rounds=7", "lora.target_modules=['q_proj']", "run.name=abc"]
    )
    assert spec.federate.rounds == 7 and spec.lora.target_modules == ["q_proj"] and spec.run.name == "abc"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("federate.rounds", "expected section.key=value"),
        ("federat.rounds=3", "did you mean 'federate'"),
        ("federate.rounds=-2", "federate.rounds"),
        ("federate.rouns=2", "did you mean 'rounds'"),
    ],
)
def test_bad_overrides(tmp_path, override, needle):
    assert needle in error_of(write(tmp_path, ""), [override])


def test_workdir_is_relative_to_the_spec(tmp_path):
    spec = load_spec(write(tmp_path, "[run]\nname = 'exp'\n"))
    assert resolve_workdir(spec) == (tmp_path / "runs" / "exp").resolve()
    assert resolve_workdir(spec, tmp_path / "other") == (tmp_path / "other").resolve()


def test_sections_hash_tracks_only_named_sections(tmp_path):
    base = load_spec(write(tmp_path, ""))
    changed = load_spec(write(tmp_path, ""), ["federate.rounds=9"])
    assert sections_hash(base, ["profile"]) == sections_hash(changed, ["profile"])
    assert sections_hash(base, ["federate"]) != sections_hash(changed, ["federate"])
    assert sections_hash(base, ["run.seed"]) != sections_hash(load_spec(write(tmp_path, ""), ["run.seed=1"]), ["run.seed"])
