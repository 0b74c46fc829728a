"""Fixtures for the federated runtime: a real quantized tiny client model, and workdirs whose
upstream stages (profile .. quantize) are complete, so `pipeline.execute` runs `federate` for real.

`align/` and `quantize/` hold a real sub-LLM (the tiny llama with one layer pruned; float and NF4)
and its layer map; profile and prune are empty but valid stage folders, because the pipeline checks
the whole chain for staleness.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fedsoda_cli import artifacts, pipeline
from fedsoda_cli.models.layer_map import LayerMap
from fedsoda_cli.spec import load_spec, resolve_workdir, sections_hash

REPO = Path(__file__).resolve().parents[2]

# 2 workers x 1 thread: run.threads pins the split, so numbers do not depend on the machine's cores.
SPEC = """\
# python -m tests.federated.run_federate SPEC   (what the SIGKILL test runs)
[run]
name = "fed-test"
seed = 3
threads = 2
workdir = "work"

[model]
name = "tiny-random-llama"

[public_data]
sequences = 4
seq_len = 16
heldout_sequences = 1

[task]
name = "sst2"
train_examples = 48
max_len = 48

[lora]
r = 4
alpha = 8

[align]
batch_size = 2

[realign]
steps = 2

[federate]
clients = 4
clients_per_round = 3
rounds = 4
workers = 2
local_steps = 2
batch_size = 4
lr = 0.01
realign_every = 2
"""


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)


LAYER_MAP = LayerMap([0, 1, 2, 4, 5], 6, [[3]], "sgp")


@pytest.fixture(scope="session")
def sub_llm(tmp_path_factory) -> dict[str, Path]:
    """The tiny random llama with layer 3 pruned: {"float": the aligned float sub-LLM folder (what
    align/ holds), "client": it quantized to NF4 as the quantize stage saves it}."""
    from fedsoda_cli.models.layers import drop_layers
    from fedsoda_cli.models.load import load_causal_lm, save_checkpoint
    from fedsoda_cli.models.quantized import quantize_checkpoint, save_client_model
    from fedsoda_cli.spec.schema import ModelSpec, QuantizeSpec

    root = tmp_path_factory.mktemp("sub-llm")
    model, tokenizer = load_causal_lm(ModelSpec(name="tiny-random-llama"))
    assert drop_layers(model, LAYER_MAP.removed_groups[0]) == LAYER_MAP.kept
    save_checkpoint(model, tokenizer, root / "float")
    quantized = quantize_checkpoint(root / "float", QuantizeSpec())
    save_client_model(quantized, tokenizer, root / "client")
    return {"float": root / "float", "client": root / "client"}


@pytest.fixture(scope="session")
def client_model_dir(sub_llm) -> Path:
    return sub_llm["client"]


def write_spec(folder: Path) -> Path:
    """SPEC as `folder`/spec.toml (its workdir is `folder`/work)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.toml"
    path.write_text(SPEC)
    return path


def prepare_run(folder: Path, sub_llm: dict[str, Path], overrides: list[str] = ()):
    """A spec file in `folder` and its workdir with every stage before federate complete (align/
    and quantize/ hold the sub-LLM, float and NF4). Returns (spec, workdir, spec_path)."""
    spec_path = write_spec(folder)
    spec = load_spec(spec_path, list(overrides))
    workdir = resolve_workdir(spec)
    content = {"align": sub_llm["float"], "quantize": sub_llm["client"]}
    for stage in pipeline.stages_for(spec):
        if stage.name == "federate":
            break
        inputs = {name: artifacts.read_manifest(workdir, name).digest() for name in stage.inputs}
        with artifacts.write_stage(workdir, stage.name, sections_hash(spec, stage.sections), inputs) as writer:
            if stage.name in content:
                shutil.copytree(content[stage.name], writer.path / "model")
                LAYER_MAP.write(writer.path / "layer_map.json")
    return spec, workdir, spec_path


@pytest.fixture(scope="session")
def shards() -> dict[int, list[tuple[str, str]]]:
    """Six clients' (prompt, answer) pairs: 48 real SST-2 training examples, 8 per client."""
    from fedsoda_cli.data.paths import resolve_data_dir
    from fedsoda_cli.data.tasks import load_task
    from fedsoda_cli.spec.schema import DataSpec, TaskSpec

    data_dir = resolve_data_dir(DataSpec(), None)
    if data_dir is None:
        pytest.skip("../shared/data is not available")
    examples = load_task(TaskSpec(name="sst2", train_examples=48), data_dir, "train", seed=0)
    return {client: [(e.prompt, e.answer) for e in examples[client * 8 : (client + 1) * 8]] for client in range(6)}


TRAINING = dict(local_steps=2, batch_size=4, lr=0.01, optimizer="adamw", max_grad_norm=1.0, proximal_mu=0.01, max_len=48)


def worker_setup(client_model: Path, shards, threads: int = 1, **training):
    """The WorkerSetup the stage would build, for the tiny client model and `shards`."""
    from fedsoda_cli.federated.client import LocalTraining
    from fedsoda_cli.federated.worker import WorkerSetup
    from fedsoda_cli.models.adapters import LoraShape
    from fedsoda_cli.spec.schema import LoraSpec

    return WorkerSetup(
        model_dir=str(client_model),
        lora=LoraShape.from_spec(LoraSpec(r=4, alpha=8)),
        lora_seed=11,
        threads=threads,
        training=LocalTraining(**{**TRAINING, **training}),
        shards=shards,
    )
