"""The CLI through Typer's runner (in-process) and once as a real subprocess."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fedsoda_cli import pipeline
from fedsoda_cli.cli.app import app
from tests.pipeline.test_staleness import CALLS, STAGES  # noqa: F401  (toy stages)

runner = CliRunner()


@pytest.fixture
def toy(monkeypatch, tmp_path):
    monkeypatch.setitem(pipeline.PIPELINES, "fedsoda", STAGES)
    CALLS.clear()
    spec = tmp_path / "spec.toml"
    spec.write_text("[run]\nname = 'toy'\n[profile]\nmax_span = 2\n")
    return spec


def test_run_then_skip_then_force(toy):
    first = runner.invoke(app, ["run", str(toy)])
    assert first.exit_code == 0, first.output
    assert CALLS == ["first", "second"]
    again = runner.invoke(app, ["run", str(toy)])
    assert again.exit_code == 0 and CALLS == ["first", "second"]
    assert "up to date, skipped" in again.output
    forced = runner.invoke(app, ["run", str(toy), "--force", "--from", "second"])
    assert forced.exit_code == 0 and CALLS == ["first", "second", "second"]


def test_run_reruns_stale_stages(toy):
    runner.invoke(app, ["run", str(toy)])
    result = runner.invoke(app, ["run", str(toy), "--set", "prune.groups=2"])
    assert result.exit_code == 0 and CALLS == ["first", "second", "second"]
    assert "stale" in result.output


def test_status_json(toy):
    runner.invoke(app, ["run", str(toy), "--to", "first"])
    result = runner.invoke(app, ["status", str(toy), "--json"])
    assert result.exit_code == 0
    assert [(s["stage"], s["state"]) for s in json.loads(result.output)] == [("first", "done"), ("second", "missing")]


def test_bad_range(toy):
    result = runner.invoke(app, ["run", str(toy), "--from", "nope"])
    assert result.exit_code == 2 and "not a stage" in result.output


def test_spec_error_is_one_line_exit_2(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text("[federate]\nround = 3\n")
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2
    assert "unknown key 'federate.round'" in result.output
    assert "Traceback" not in result.output


def test_validate_unknown_aggregator_suggests(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text("[federate]\naggregator = 'fedav'\n")
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 4 and "did you mean 'fedavg'" in result.output


def test_real_subprocess_validate_and_error(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[run]\nname = 'sub'\n")
    done = subprocess.run(
        [sys.executable, "-m", "fedsoda_cli", "validate", str(good)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[prune]\ngroups = -1\n")
    failed = subprocess.run(
        [sys.executable, "-m", "fedsoda_cli", "validate", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert failed.returncode == 2
    assert failed.stderr.strip().startswith("error:") and "prune.groups" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr
