"""A client worker: holds ONE copy of the client model and serves many clients' tasks with it.

`ClientRuntime` is what a worker does (load the model once, swap adapters per task, swap in
realigned layers); `serve` is the worker process's main loop around it, speaking framed byte
messages (see messages.py) over a pipe: setup comes from a JSON file (`WorkerSetup.to_json`), then
  server -> worker: init | task | layers | stop
  worker -> server: ready | adapter | result | error | fatal
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fedsoda_cli.federated.client import LocalTraining
from fedsoda_cli.federated.messages import ClientResult, ClientTask, pack, pack_result, unpack, unpack_task
from fedsoda_cli.models.adapters import LoraShape


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a model holder needs once, in typed frozen parts: the client model, LoRA, training
    config and the shards it serves. `to_json`/`from_json` are its one serialized form: the local
    pool's setup file and, without the server's own folder and shards (`shared`), what the server
    sends every Flower site."""

    model_dir: str
    lora: LoraShape
    lora_seed: int
    threads: int
    training: LocalTraining
    shards: dict[int, list[tuple[str, str]]]  # client -> [(prompt, answer), ...]
    lora_layers: tuple[int, ...] | None = None  # client-model layer indices with LoRA (None = all)
    wire_dtype: str = "fp32"  # how the trained adapter travels back (federate.wire_dtype)

    def __post_init__(self) -> None:
        if self.lora_layers is not None:
            object.__setattr__(self, "lora_layers", tuple(self.lora_layers))

    def shared(self) -> WorkerSetup:
        """What every site of a run shares: this setup without the server's model folder, threads
        and shards (a site has its own, and fills them in)."""
        return replace(self, model_dir="", threads=0, shards={})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WorkerSetup:
        data = json.loads(text)
        return cls(
            **{
                **data,
                "lora": LoraShape(**data["lora"]),
                "training": LocalTraining(**data["training"]),
                "shards": {int(client): [tuple(pair) for pair in pairs] for client, pairs in data["shards"].items()},
            }
        )

    def write(self, path: Path) -> Path:
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, path: Path) -> WorkerSetup:
        return cls.from_json(Path(path).read_text())


class ClientRuntime:
    """One loaded client model serving client tasks; `model_loads` counts how often it loaded (1)."""

    def __init__(self, setup: WorkerSetup):
        from fedsoda_cli.data.tasks import Example
        from fedsoda_cli.federated.client import load_client, lora_slots

        started = time.perf_counter()
        self.model, self.tokenizer = load_client(Path(setup.model_dir), setup.lora, setup.lora_seed, setup.lora_layers)
        self.load_seconds = time.perf_counter() - started
        self.model_loads = 1
        self.slots = lora_slots(self.model)
        self.training = setup.training
        self.wire_dtype = setup.wire_dtype
        from fedsoda_cli.federated.layer_delta import HeldLayers
        from fedsoda_cli.models.quantized import WEIGHTS

        self.held = HeldLayers(Path(setup.model_dir) / WEIGHTS)  # the version of the layers this holder has
        self.shards = {
            client: [Example(f"client{client}-{i}", prompt, answer, None, None) for i, (prompt, answer) in enumerate(pairs)]
            for client, pairs in setup.shards.items()
        }

    def initial_adapter(self) -> bytes:
        """The freshly initialised LoRA adapter (the same in every worker: seeded init)."""
        from fedsoda_cli.federated.client import adapter_state
        from fedsoda_cli.federated.messages import adapter_to_bytes

        return adapter_to_bytes(adapter_state(self.model))

    def apply_layers(self, payload: bytes) -> None:
        """Swap in realigned partial layers: the whole layers, or a delta against the version held."""
        from safetensors.torch import load

        from fedsoda_cli.federated.layer_delta import apply_delta, is_delta
        from fedsoda_cli.oda.realign import apply_partial_layers

        tensors = apply_delta(self.held, payload) if is_delta(payload) else load(payload)
        apply_partial_layers(self.model, tensors)
        self.held.update(tensors)

    def handle(self, task: ClientTask, worker: int) -> ClientResult[bytes]:
        """Train `task.client` from the global adapter in `task.adapter`; the result as bytes."""
        from fedsoda_cli.federated.client import train_client
        from fedsoda_cli.federated.messages import adapter_from_bytes

        if task.client not in self.shards:
            raise ValueError(f"this worker holds no shard for client {task.client}")
        trained = train_client(
            self.model,
            self.tokenizer,
            adapter_from_bytes(task.adapter),
            self.shards[task.client],
            self.training,
            task.seed,
            self.slots,
            round=task.round,
            client=task.client,
        )
        result = trained.encoded(self.wire_dtype, worker=worker)
        _release_memory()
        result.rss_mb = resident_mb()
        return result


def serve(conn, slot: int, setup_path: str) -> None:
    """Worker process main loop (the target of a spawned process). Exits on `stop` or when the
    server goes away; a failed model load is reported as `fatal`, a failed task as `error`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle: it stops us
    _die_with_parent()
    setup = WorkerSetup.read(Path(setup_path))
    os.environ["OMP_NUM_THREADS"] = str(setup.threads)
    import torch

    from fedsoda_cli.terminal import quiet_third_party

    torch.set_num_threads(setup.threads)
    quiet_third_party()  # one "Loading weights" bar or deprecation note per worker is noise in the server's terminal
    try:
        runtime = ClientRuntime(setup)
    except Exception as exc:  # reported, so the server can stop with the reason instead of respawning
        message = str(exc) if _is_user_error(exc) else f"{type(exc).__name__}: {exc}"
        conn.send_bytes(pack("fatal", {"message": f"could not load the client model: {message}"}))
        return
    try:
        conn.send_bytes(
            pack("ready", {"pid": os.getpid(), "model_loads": runtime.model_loads, "load_seconds": runtime.load_seconds})
        )
        while _serve_one(conn, runtime, slot):
            pass
    except (EOFError, OSError):
        return  # the server is gone (its end of the pipe closed)


def _serve_one(conn, runtime: ClientRuntime, slot: int) -> bool:
    """Handle one message from the server; False when told to stop."""
    kind, header, payload = unpack(conn.recv_bytes())
    if kind == "stop":
        return False
    if kind == "init":
        conn.send_bytes(pack("adapter", {}, runtime.initial_adapter()))
    elif kind == "layers":
        try:
            runtime.apply_layers(payload)
        except Exception as exc:  # a worker without the realigned layers must not train: stop the run
            conn.send_bytes(pack("fatal", {"message": f"could not swap in the realigned layers: {type(exc).__name__}: {exc}"}))
            return False
    elif kind == "task":
        task = unpack_task(header, payload)
        try:
            result = runtime.handle(task, slot)
        except Exception as exc:  # a failed client is the server's to retry or drop, not a dead worker
            conn.send_bytes(
                pack("error", {"round": task.round, "client": task.client, "message": f"{type(exc).__name__}: {exc}"})
            )
        else:
            conn.send_bytes(pack_result(result))
    return True


def resident_mb() -> float:
    """This process's resident memory in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _release_memory() -> None:
    """Hand freed heap back to the OS after each task, so resident memory does not creep over rounds.
    (No full gc.collect(): it costs ~0.25 s per task on a transformers heap, and training frees
    its tensors by reference counting anyway.)"""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the server process dies (even by SIGKILL): no orphans."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the closed pipe still ends the worker after its current task


def _is_user_error(exc: Exception) -> bool:
    from fedsoda_cli.errors import FedsodaError

    return isinstance(exc, FedsodaError)
