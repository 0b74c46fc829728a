"""Safety: weights and client updates are never unpickled, artifact paths stay inside the workdir,
and plugins load only from installed entry points or the files a spec names, never from artifacts."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from .conftest import (
    REPO,
    assert_fails,
    assert_one_line_error,
    fedsoda,
    fedsoda_process,
    snapshot,
)

SOURCES = sorted([*(REPO / "fedsoda_cli").rglob("*.py"), *(REPO / "plugins").glob("*.py")])

# Ways Python code can end up unpickling (running) what it reads, and the one acceptable form.
UNSAFE = {
    "pickle-family import": re.compile(
        r"^\s*(import|from)\s+(pickle|_pickle|cPickle|dill|cloudpickle|joblib|shelve|marshal)\b", re.MULTILINE
    ),
    "pickle call": re.compile(r"\bpickle\.(loads?|Unpickler)\b"),
    "numpy pickle": re.compile(r"allow_pickle\s*=\s*True"),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
    "safetensors turned off": re.compile(r"use_safetensors\s*=\s*False"),
    "remote code": re.compile(r"trust_remote_code\s*=\s*True"),
    "pickled pipe message": re.compile(r"\.recv\(\s*\)"),  # multiprocessing's recv() unpickles; recv_bytes() does not
}


def call_text(source: str, start: int) -> str:
    """The text of the call whose '(' follows `start`, up to its matching ')'."""
    depth = 0
    for index in range(source.index("(", start), len(source)):
        depth += {"(": 1, ")": -1}.get(source[index], 0)
        if depth == 0:
            return source[start : index + 1]
    return source[start:]


def test_the_package_never_unpickles_weights_artifacts_or_client_messages():
    """Weights come from safetensors (or torch.load(weights_only=True)); updates travel as safetensors bytes."""
    hits = []
    for path in SOURCES:
        source = path.read_text()
        rel = path.relative_to(REPO)
        for what, pattern in UNSAFE.items():
            hits += [f"{rel}: {what}: {m.group(0).strip()}" for m in pattern.finditer(source)]
        for found in re.finditer(r"\btorch\.load\(", source):
            call = call_text(source, found.start())
            if not re.search(r"weights_only\s*=\s*True", call):
                hits.append(f"{rel}: torch.load without weights_only=True: {call}")
    assert len(SOURCES) > 50 and not hits, "\n".join(hits)


class RunsCode:
    """A pickle that, when unpickled, creates `marker`: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_checkpoint_is_refused_without_running_it(spec_path, template, workdir, tmp_path):
    model = tmp_path / "pickled-model"
    model.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(template / "prune" / "model" / name, model / name)
    marker = tmp_path / "code-ran"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": RunsCode(marker)}, protocol=4))
    before = snapshot(workdir)
    done = fedsoda_process("profile", spec_path, "--workdir", workdir, "--set", f"model.path='{model}'")  # stderr as CI sees it
    assert_one_line_error(
        done.returncode,
        done.stderr,
        6,
        f"model.path {model}: cannot load the weights (UnpicklingError: Weights only load failed",
        "re-save or re-download the checkpoint",
    )
    assert not marker.exists()
    assert snapshot(workdir) == before


def test_an_adapter_must_be_safetensors(spec_path, template, workdir, tmp_path):
    adapter = tmp_path / "pickled-adapter"
    adapter.mkdir()
    shutil.copy(template / "federate" / "adapter" / "adapter_config.json", adapter)
    marker = tmp_path / "code-ran"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"w": RunsCode(marker)}))
    result = fedsoda("realign", spec_path, "--workdir", workdir, "--adapter", adapter)
    assert_fails(result, "model", f"adapter {adapter}", "needs adapter_config.json and adapter_model.safetensors")
    assert not marker.exists()


def edit_manifest(workdir: Path, stage: str, change) -> None:
    path = workdir / stage / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def listing(workdir: Path, rel: str, source: Path):
    """A change that adds `rel` to a manifest's outputs, with the true size and hash of `source`."""
    from fedsoda_cli.artifacts import sha256_file

    return lambda data: data["outputs"].__setitem__(rel, {"bytes": source.stat().st_size, "sha256": sha256_file(source)})


def test_a_manifest_listing_a_path_with_dot_dot_is_refused(spec_path, workdir):
    edit_manifest(workdir, "prune", listing(workdir, "../profile/distances.csv", workdir / "profile" / "distances.csv"))
    refused(spec_path, workdir, "../profile/distances.csv")


def test_a_manifest_listing_an_absolute_path_is_refused(spec_path, workdir, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    edit_manifest(workdir, "prune", listing(workdir, str(outside), outside))
    refused(spec_path, workdir, str(outside))


def test_a_manifest_naming_a_stage_outside_the_workdir_is_refused(spec_path, workdir):
    edit_manifest(workdir, "prune", lambda data: data.__setitem__("stage", "../../elsewhere"))
    refused(spec_path, workdir, "../../elsewhere")


def test_a_stage_file_linking_out_of_the_workdir_is_refused(spec_path, workdir, tmp_path):
    """Even with the very content the manifest expects."""
    outside = tmp_path / "layer_map.json"
    shutil.copy(workdir / "prune" / "layer_map.json", outside)
    (workdir / "prune" / "layer_map.json").unlink()
    (workdir / "prune" / "layer_map.json").symlink_to(outside)
    refused(spec_path, workdir, "layer_map.json")


def test_a_stage_folder_linking_out_of_the_workdir_is_refused(spec_path, workdir, tmp_path):
    shutil.move(workdir / "prune", tmp_path / "prune")
    (workdir / "prune").symlink_to(tmp_path / "prune")
    refused(spec_path, workdir, "prune")


def refused(spec_path: Path, workdir: Path, path: str) -> None:
    before = snapshot(workdir)
    result = fedsoda("align", spec_path, "--workdir", workdir)
    assert_fails(result, "artifact", path, "refers outside the workdir", "artifact paths must stay inside it")
    assert snapshot(workdir) == before


def test_plugins_are_never_loaded_from_a_run_folder(spec_path, workdir, tmp_path):
    """A run folder names plugins (spec.json) and holds Python files: reading, checking and resuming
    the run imports none of them. Only the spec's `plugins` and installed entry points are loaded."""
    marker = tmp_path / "code-ran"
    code = f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
    for folder in (workdir, workdir / "prune", workdir / "federate"):
        (folder / "evil.py").write_text(code)
    spec_json = json.loads((workdir / "spec.json").read_text())
    (workdir / "spec.json").write_text(json.dumps({**spec_json, "plugins": ["evil.py", "prune/evil.py"]}))
    for args in (
        ["status", spec_path, "--workdir", workdir],
        ["run", spec_path, "--workdir", workdir],
        ["report", workdir, "--out", tmp_path / "report"],
    ):
        result = fedsoda(*args)
        assert result.exit_code == 0, result.output
    assert not marker.exists()


@pytest.mark.parametrize("doc", ["docs/plugins.md", "docs/reliability.md"])
def test_the_docs_say_plainly_that_a_plugin_runs_with_your_rights(doc):
    assert "A plugin is code that runs with your rights" in (REPO / doc).read_text()
