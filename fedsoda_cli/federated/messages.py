"""What crosses between the server and a client: typed records, serialized as bytes.

Adapter tensors travel as `safetensors` bytes (never pickle: a client must not be able to run code
on the server by sending a crafted update); everything else is a small JSON header. The byte
length of a serialized adapter is exactly what communication accounting counts.

A framed message is `len(header) (4 bytes, big endian) + header JSON + payload bytes`.

`ClientResult` is the one record of a client's round, from training to the server: `train_client`
returns it with the adapter as tensors, `encoded` turns those into the wire bytes (the worker's one
step), and pack_result/unpack_result, the transports and the server only ever see the bytes form.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import torch

    from fedsoda_cli.plugins.contracts import AdapterState

_HEADER_LEN = struct.Struct(">I")

A = TypeVar("A")  # a result's adapter: AdapterState (tensors) where it trained, bytes on the wire


@dataclass
class ClientTask:
    """One client's work for one round: train the global adapter (`adapter`, serialized) locally."""

    round: int
    client: int
    seed: int  # derived from (run.seed, round, client): the same wherever and whenever it runs
    adapter: bytes


@dataclass
class ClientResult(Generic[A]):
    """What a client sends back: its trained adapter and what it saw. `adapter` is tensors
    (`ClientResult[AdapterState]`, as `train_client` returns it) until `encoded` for the wire
    (`ClientResult[bytes]`: what is framed, transported and aggregated)."""

    round: int
    client: int
    adapter: A
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    start_digest: str = ""  # digest of the LoRA weights the client started from (state-isolation check)
    worker: int = -1
    train_seconds: float = 0.0  # time inside the local training loop only
    rss_mb: float = 0.0  # the worker's resident memory after the task

    def encoded(self: ClientResult[AdapterState], wire_dtype: str = "fp32", **fields: Any) -> ClientResult[bytes]:
        """This result with its adapter tensors serialized (`adapter_to_bytes` in `wire_dtype`) and
        `fields` (e.g. worker) set; every other field as it is."""
        result: ClientResult[Any] = self  # replace() keeps the type parameter; here the adapter's type changes
        return replace(result, adapter=adapter_to_bytes(self.adapter, wire_dtype), **fields)


@dataclass
class TaskFailure:
    """A task that produced no result: the worker died, timed out, or training raised."""

    round: int
    client: int
    reason: str
    worker: int = -1


def pack(kind: str, header: dict[str, Any] | None = None, payload: bytes = b"") -> bytes:
    """Frame a message: kind and header as JSON, then the raw payload."""
    blob = json.dumps({"kind": kind, **(header or {})}, sort_keys=True).encode()
    return _HEADER_LEN.pack(len(blob)) + blob + payload


def unpack(message: bytes) -> tuple[str, dict[str, Any], bytes]:
    """Inverse of `pack`: (kind, header without kind, payload)."""
    (length,) = _HEADER_LEN.unpack_from(message)
    header = json.loads(message[_HEADER_LEN.size : _HEADER_LEN.size + length])
    return header.pop("kind"), header, message[_HEADER_LEN.size + length :]


def pack_task(task: ClientTask) -> bytes:
    return pack("task", {"round": task.round, "client": task.client, "seed": task.seed}, task.adapter)


def unpack_task(header: dict[str, Any], payload: bytes) -> ClientTask:
    return ClientTask(round=int(header["round"]), client=int(header["client"]), seed=int(header["seed"]), adapter=payload)


def pack_result(result: ClientResult[bytes]) -> bytes:
    if not isinstance(result.adapter, bytes):
        raise TypeError("pack_result: the result's adapter is tensors; send result.encoded(wire_dtype)")
    header = {k: v for k, v in asdict(result).items() if k != "adapter"}
    return pack("result", header, result.adapter)


def unpack_result(header: dict[str, Any], payload: bytes) -> ClientResult[bytes]:
    return ClientResult(adapter=payload, **header)


def adapter_to_bytes(adapter: AdapterState, wire_dtype: str = "fp32") -> bytes:
    """Serialize adapter tensors with safetensors (contiguous copies; names sorted by safetensors),
    floating tensors rounded to `wire_dtype` ("fp32", "bf16" or "fp16")."""
    import torch
    from safetensors.torch import save

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[wire_dtype]
    return save(
        {
            name: (tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()).contiguous()
            for name, tensor in adapter.items()
        }
    )


def adapter_from_bytes(blob: bytes) -> AdapterState:
    """Deserialize safetensors bytes, floating tensors back in float32 (the precision both sides
    train and aggregate in, whatever the wire carried); ValueError on anything that is not a
    safetensors blob."""
    from safetensors.torch import load

    try:
        tensors = load(blob)
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ValueError(f"not a safetensors adapter ({type(exc).__name__}: {exc})") from None
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in tensors.items()}


def adapter_digest(adapter: Mapping[str, torch.Tensor]) -> str:
    """A digest of names, dtypes, shapes and values: equal digests mean bit-identical adapters."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(adapter):
        tensor = adapter[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
