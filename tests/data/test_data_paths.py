from pathlib import Path

import pytest

from fedsoda_cli.data.paths import ENV_VAR, data_file, default_shared_dir, resolve_data_dir
from fedsoda_cli.errors import DataError
from fedsoda_cli.spec.schema import DataSpec


def test_spec_dir_wins_and_is_relative_to_spec(tmp_path, monkeypatch):
    (tmp_path / "mydata").mkdir()
    monkeypatch.setenv(ENV_VAR, str(tmp_path))  # lower priority than data.dir
    assert resolve_data_dir(DataSpec(dir="mydata"), tmp_path) == (tmp_path / "mydata").resolve()


def test_env_var_used_when_spec_unset(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert resolve_data_dir(DataSpec(), None) == tmp_path.resolve()


def test_missing_spec_dir_names_key(tmp_path):
    with pytest.raises(DataError, match=r"data\.dir = 'nope'") as err:
        resolve_data_dir(DataSpec(dir="nope"), tmp_path)
    assert str(tmp_path / "nope") in str(err.value)


def test_missing_env_dir_names_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"\$FEDSODA_DATA"):
        resolve_data_dir(DataSpec(), None)


def test_file_instead_of_dir_is_an_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        resolve_data_dir(DataSpec(dir=str(tmp_path / "f")), None)


def test_shared_default_beside_repo(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    expected = default_shared_dir()
    assert expected == Path(__file__).resolve().parents[2].parent / "shared" / "data"
    assert resolve_data_dir(DataSpec(), None) == (expected.resolve() if expected.is_dir() else None)


def test_data_file_names_full_path(tmp_path):
    with pytest.raises(DataError) as err:
        data_file(tmp_path, "sst2/train.jsonl")
    msg = str(err.value)
    assert str(tmp_path / "sst2" / "train.jsonl") in msg and "data.dir" in msg and "\n" not in msg


def test_data_file_found(data_dir):
    assert data_file(data_dir, "sst2/dev.jsonl").is_file()
