"""Values that must be refused, files fedsoda wrote that were damaged afterwards, user text that rich
must not read as markup, and SIGTERM. Each through the real CLI: one line, the documented exit
code, and the run's artifacts unchanged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsoda_cli import artifacts
from fedsoda_cli.models import builtin
from fedsoda_cli.plugins import Aggregator, Registry, aggregators

from .conftest import EXIT, assert_fails, assert_no_scratch_left, assert_one_line_error, fedsoda, snapshot
from .test_faults import CHECKPOINTS, start, wait_for, workers_of

FIXTURES = [HealthCheck.function_scoped_fixture]

# ---- plugins --------------------------------------------------------------------------------------


def _aggregator_file(folder: Path, file_name: str, name: str) -> Path:
    path = folder / file_name
    path.write_text(
        "from fedsoda_cli.plugins import Aggregator, aggregators\n\n"
        f"@aggregators.register({name!r})\n"
        "class Mine(Aggregator):\n"
        "    def aggregate(self, round, global_adapter, updates):\n"
        "        return global_adapter\n"
    )
    return path


def test_a_plugin_cannot_take_a_name_already_registered(tmp_path):
    builtin_clash = _aggregator_file(tmp_path, "clash_builtin.py", "fedavg")
    first = _aggregator_file(tmp_path, "twin_one.py", "reliability-twin")
    second = _aggregator_file(tmp_path, "twin_two.py", "reliability-twin")
    spec = tmp_path / "spec.toml"
    spec.write_text(f'plugins = ["{builtin_clash.name}"]\n')
    assert_fails(
        fedsoda("validate", spec),
        "plugin",
        "aggregator 'fedavg' is registered twice",
        "built-in fedsoda_cli.plugins.aggregators.fedavg:FedAvg",
        str(builtin_clash),
        "give the plugin another name",
    )
    spec.write_text(f'plugins = ["{first.name}", "{second.name}"]\n')
    assert_fails(
        fedsoda("validate", spec), "plugin", "aggregator 'reliability-twin' is registered twice", str(first), str(second)
    )
    assert aggregators.get("fedavg").__module__ == "fedsoda_cli.plugins.aggregators.fedavg"  # the built-in stayed


def test_the_builtins_and_their_own_entry_points_are_one_plugin():
    """An installed fedsoda's metadata may still list the built-ins as entry points (installs made before
    they were declared only in code): the same target is no clash."""
    fresh = Registry(
        "aggregator",
        "fedsoda.aggregators",
        Aggregator,
        {"fedavg": "fedsoda_cli.plugins.aggregators.fedavg:FedAvg", "fedavgm": "fedsoda_cli.plugins.aggregators.fedavgm:FedAvgM"},
    )
    assert {"fedavg", "fedavgm"} <= set(fresh.names())
    assert fresh.create("fedavg", seed=0) is not None


@pytest.mark.parametrize("code", [0, 3, None])
def test_a_plugin_file_that_calls_sys_exit_is_a_plugin_error(tmp_path, code):
    plugin = tmp_path / f"exits_{code}.py"
    plugin.write_text(f"import sys\nsys.exit({code!r})\n")
    spec = tmp_path / "spec.toml"
    spec.write_text(f'plugins = ["{plugin.name}"]\n')
    assert_fails(
        fedsoda("validate", spec), "plugin", f"plugin file {plugin} called sys.exit({code!r})", "only define and register"
    )


# ---- values refused at validate -------------------------------------------------------------------

VALUE_CASES = {
    # case: (--set overrides, kind, needles)
    "a billion clients": (["federate.clients=1000000000"], "spec", ["federate.clients", "less than or equal to 10000"]),
    "a seed of 2**32": (["run.seed=4294967296"], "spec", ["run.seed", "less than or equal to 4294967295"]),
    "no eval targets": (["eval.targets=[]"], "spec", ["eval.targets", "at least 1 item"]),
    "no per-round eval targets": (["federate.eval_targets=[]"], "spec", ["federate.eval_targets", "at least 1 item"]),
    "no lora layers": (["lora.layers=[]"], "spec", ["lora.layers is empty", "omit the key"]),
    "a lora layer past the model": (["lora.layers=[1, 6]"], "spec", ["lora.layers holds 6", "the model has 6 layers"]),
    "more layers pruned than the model has": (
        ["prune.groups=3", "prune.group_size=2"],
        "spec",
        ["removes 6 of the model's 6 layers", "lower prune.groups or prune.group_size"],
    ),
    "a model path that does not exist": (
        ["model.path='/nonexistent/model'"],
        "model",
        ["model.path /nonexistent/model: no such folder"],
    ),
    "a format spec": (["task.prompt='Review: {sentence:d}'"], "spec", ["task.prompt", "Unknown format code 'd'", "plain {name}"]),
    "a conversion": (["task.prompt='{sentence!x}'"], "spec", ["task.prompt", "Unknown conversion specifier x"]),
    "an attribute": (["task.prompt='{label.real.foo}'"], "spec", ["task.prompt", "has no attribute 'real'"]),
}


@pytest.mark.parametrize("case", VALUE_CASES)
def test_a_value_that_would_fail_later_is_refused_by_validate(case, spec_path):
    overrides, kind, needles = VALUE_CASES[case]
    result = fedsoda("validate", spec_path, *[arg for o in overrides for arg in ("--set", o)])
    assert_fails(result, kind, *needles)


def test_validate_reads_the_depth_of_a_model_folder_from_its_config(spec_path, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "num_hidden_layers": 4,
                "hidden_size": 64,
                "num_attention_heads": 4,
                "intermediate_size": 128,
            }
        )
    )
    result = fedsoda("validate", spec_path, "--set", f"model.path='{model}'", "--set", "prune.groups=2")
    assert_fails(result, "spec", "removes 2 of the model's 4 layers, but at most 1 can go")
    assert fedsoda("validate", spec_path, "--set", f"model.path='{model}'").exit_code == 0  # no weights needed to validate


# ---- files fedsoda wrote, damaged -----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _damage(data, original: bytes) -> bytes:
    """A damaged copy of a file: truncated, a byte flipped, random bytes, other JSON, deep nesting, or
    (for a JSON object) a key dropped or its value replaced."""
    how = data.draw(st.sampled_from(["truncate", "flip", "bytes", "json", "nested", "drop", "replace"]))
    if how == "truncate":
        return original[: data.draw(st.integers(0, max(0, len(original) - 1)))]
    if how == "flip":
        at = data.draw(st.integers(0, len(original) - 1))
        return original[:at] + bytes([original[at] ^ data.draw(st.integers(1, 255))]) + original[at + 1 :]
    if how == "bytes":
        return data.draw(st.binary(max_size=64).filter(lambda b: b != original))
    if how == "nested":
        return b"[" * 100_000 + b"]" * 100_000
    try:
        parsed = json.loads(original)
    except ValueError:
        parsed = None
    if how == "json" or not isinstance(parsed, dict) or not parsed:
        return json.dumps(data.draw(json_values)).encode()
    key = data.draw(st.sampled_from(sorted(parsed)))
    if how == "drop":
        parsed.pop(key)
    else:
        parsed[key] = data.draw(json_values.filter(lambda v: v != parsed[key]))
    return json.dumps(parsed).encode()


@contextmanager
def scratch_copy(template, tmp_path_factory, name: str) -> Iterator[Path]:
    """A private copy of the template run for one hypothesis example, removed after it: 30 examples
    x 2 tests of a 43 MB run would otherwise stay on disk until the session ends."""
    folder = tmp_path_factory.mktemp(name)
    try:
        shutil.copytree(template, folder / "run", symlinks=True)
        yield folder / "run"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@settings(max_examples=30, deadline=None, suppress_health_check=FIXTURES)
@given(data=st.data())
def test_a_damaged_manifest_is_an_artifact_error(spec_path, template, tmp_path_factory, data):
    with scratch_copy(template, tmp_path_factory, "manifest") as workdir:
        stage = data.draw(st.sampled_from(["profile", "prune", "federate", "eval"]))
        path = workdir / stage / artifacts.MANIFEST
        path.write_bytes(_damage(data, path.read_bytes()))
        before = snapshot(workdir)
        result = fedsoda("status", spec_path, "--workdir", workdir)
        if result.exit_code != 0:  # a damage that leaves a well-formed manifest may pass status (run hashes the files)
            assert_fails(result, "artifact", str(workdir / stage))
        assert snapshot(workdir) == before


REPORT_FILES = {
    "spec.json": None,
    "eval/results.json": "eval",
    "federate/metrics.jsonl": "federate",
    "federate/summary.json": "federate",
}


@settings(max_examples=30, deadline=None, suppress_health_check=FIXTURES)
@given(data=st.data())
def test_report_on_a_damaged_file_is_an_artifact_error(template, tmp_path_factory, data):
    with scratch_copy(template, tmp_path_factory, "report") as workdir:
        rel = data.draw(st.sampled_from(sorted(REPORT_FILES)))
        path = workdir / rel
        damaged = _damage(data, path.read_bytes())
        path.write_bytes(damaged)
        before = snapshot(workdir)
        result = fedsoda("report", workdir, "--out", workdir.parent / "report")
        if REPORT_FILES[rel] is not None:  # listed in its stage's manifest: any change is caught by its sha256
            assert_fails(result, "artifact", str(path), f"fedsoda {REPORT_FILES[rel]} SPEC --force")
        elif result.exit_code != 0:  # spec.json is a record of the spec, not a hashed output: well-formed JSON may pass
            assert_fails(result, "artifact", str(path), "fedsoda run SPEC")
        assert snapshot(workdir) == before


def test_a_replaced_rng_state_stops_resume(spec_path, workdir):
    import torch
    from safetensors.torch import save_file

    latest = sorted((workdir / CHECKPOINTS).glob("round-*"))[-1]
    save_file({"torch": torch.Generator().manual_seed(1).get_state()}, latest / "rng.safetensors")
    before = snapshot(workdir)
    result = fedsoda("federate", spec_path, "--workdir", workdir, "--resume")
    assert_fails(result, "artifact", str(latest / "rng.safetensors"), "content no longer matches", "rerun without --resume")
    assert snapshot(workdir) == before


def test_a_corrupt_tokenizer_in_the_model_cache(spec_path, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(builtin.cache_root(None) / builtin.SMOLLM2_TOKENIZER, cache / builtin.SMOLLM2_TOKENIZER)
    tokenizer = cache / builtin.SMOLLM2_TOKENIZER / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:1000])
    result = fedsoda("profile", spec_path, "--workdir", tmp_path / "run", "--set", f"model.cache_dir='{cache}'")
    assert_fails(result, "artifact", str(cache / builtin.SMOLLM2_TOKENIZER), "cached tokenizer is corrupt", "delete")


def test_an_aggregator_whose_state_dict_is_none(spec_path, workdir, tmp_path):
    # The same `plugins` entry (a part of the spec hashes) in another folder keeps every stage current.
    plugin = tmp_path / "reliability_plugins.py"
    plugin.write_text(
        "from fedsoda_cli.plugins import aggregators\n"
        "from fedsoda_cli.plugins.aggregators.fedavg import FedAvg\n\n"
        "@aggregators.register('reliability-none-state')\n"
        "class NoneState(FedAvg):\n"
        "    def state_dict(self):\n"
        "        return None\n"
    )
    spec = tmp_path / "spec.toml"
    spec.write_text(spec_path.read_text())
    before = snapshot(workdir)
    result = fedsoda(
        "federate",
        spec,
        "--workdir",
        workdir,
        "--set",
        "federate.aggregator='reliability-none-state'",
        "--set",
        "federate.rounds=1",
        "--set",
        "federate.local_steps=1",
    )
    assert_fails(result, "plugin", "aggregator 'reliability-none-state' state_dict() returned NoneType", "fix the plugin")
    stage_files = {k: v for k, v in before.items() if not k.startswith(CHECKPOINTS)}
    assert {k: v for k, v in snapshot(workdir).items() if not k.startswith(CHECKPOINTS)} == stage_files
    assert_no_scratch_left(workdir)


# ---- data files -----------------------------------------------------------------------------------

GOOD = '{"input": "a fine film", "output": "positive"}\n'


@pytest.mark.parametrize(
    "case, line, needles",
    [
        (
            "not UTF-8",
            b'{"input": "caf\xe9", "output": "positive"}\n',
            [":2: not UTF-8 text (byte 0xe9", "save the file as UTF-8"],
        ),
        ("nested too deeply", b"[" * 100_000 + b"]" * 100_000 + b"\n", [":2: JSON nested too deeply"]),
    ],
)
def test_a_task_file_with_bad_bytes_or_deep_nesting(spec_path, workdir, tmp_path, case, line, needles):
    train = tmp_path / "train.jsonl"
    train.write_bytes(GOOD.encode() + line)
    (tmp_path / "eval.jsonl").write_text(GOOD)
    before = snapshot(workdir)
    result = fedsoda(
        "federate",
        spec_path,
        "--workdir",
        workdir,
        "--set",
        "task.name='jsonl'",
        "--set",
        f"task.train_file='{train}'",
        "--set",
        f"task.eval_file='{tmp_path / 'eval.jsonl'}'",
    )
    assert_fails(result, "data", str(train), *needles)
    assert snapshot(workdir) == before


def test_wikitext_that_is_not_utf8_names_file_and_line(spec_path, tmp_path):
    data = tmp_path / "data"
    (data / "wikitext2").mkdir(parents=True)
    (data / "wikitext2" / "wiki.valid.raw").write_bytes(b" = Title = \n\n Some text .\n caf\xe9 \n")
    (data / "wikitext2" / "wiki.test.raw").write_bytes(b" = Title = \n\n Some text .\n")
    result = fedsoda("profile", spec_path, "--workdir", tmp_path / "run", "--set", f"data.dir='{data}'")
    assert_fails(result, "data", f"{data / 'wikitext2' / 'wiki.valid.raw'}:4: not UTF-8 text (byte 0xe9)")


# ---- user text and rich ---------------------------------------------------------------------------


def test_user_text_is_shown_as_written_never_as_markup(spec_path, workdir):
    result = fedsoda("validate", spec_path, "--set", "federate.aggregator='[bold]x[/]'")
    assert_fails(result, "plugin", "unknown aggregator '[bold]x[/]'")
    before = snapshot(workdir)
    result = fedsoda("run", spec_path, "--workdir", workdir, "--set", "run.name='a[b]c[bold]'")
    assert result.exit_code == 0, result.output
    assert "fedsoda run a[b]c[bold] " in result.stdout
    assert snapshot(workdir) == before


names = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=120)


@settings(max_examples=40, deadline=None)
@given(name=names)
def test_any_run_name_is_printed_literally_or_refused_in_one_line(spec_path, name):
    result = fedsoda("validate", spec_path, "--set", f"run.name={json.dumps(name)}", "--set", "run.workdir='runs/{name}'")
    if result.exit_code == 0:
        assert name.translate(_NO_SPACE) in result.stdout.translate(_NO_SPACE)  # rich may wrap the line
    else:
        assert_one_line_error(result.exit_code, result.stderr, EXIT["spec"], "run.name")


_NO_SPACE = {ord(c): None for c in string.whitespace}


@pytest.mark.parametrize(
    "command, option, value, needle",
    [
        ("profile", "--workdir", "x" * 5000, "file name too long"),  # created only by a command that writes
        ("validate", "--set", "model.path='" + "m" * 5000 + "'", "file name too long"),
        ("validate", "--set", "plugins=['" + "p" * 5000 + ".py']", "file name too long"),
        ("validate", "--set", "run.workdir='w\x00x'", "contains a NUL character"),
    ],
)
def test_a_path_the_system_cannot_take(spec_path, command, option, value, needle):
    assert_fails(fedsoda(command, spec_path, option, value), "spec", needle)


# ---- SIGTERM --------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_sigterm_ends_every_worker_in_one_line(spec_path, workdir, tmp_path):
    import psutil

    run = start(tmp_path, "federate", spec_path, "--workdir", workdir)
    try:
        wait_for(workdir / CHECKPOINTS / "round-0001" / "state.json", run)
        family = psutil.Process(run.pid).children(recursive=True)
        assert workers_of(run.pid)
        os.kill(run.pid, signal.SIGTERM)  # what `kill PID` or a CI timeout sends: the main process only
        code = run.wait(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert_one_line_error(
        code, (tmp_path / "stderr.txt").read_text(), 143, "terminated (SIGTERM)", "round checkpoints are kept", "--resume"
    )
    _, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, f"left running after SIGTERM: {[(p.pid, p.cmdline()) for p in alive]}"
    assert (workdir / CHECKPOINTS / "round-0001" / "state.json").is_file()
    assert_no_scratch_left(workdir)
