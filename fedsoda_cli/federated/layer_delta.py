"""Realigned layers as a delta: only the quantization blocks that changed since the version a client holds.

A realignment of a few steps moves the partial layers' float weights a little, and most 64-weight
NF4 blocks quantize to the very same codes and constants as before (measured: about 4 % of the
codes change in a 4-step realign). So instead of the whole layers, the server sends, per tensor of
the partial-layer artifact (`oda.realign.partial_layer_artifact`: packed codes, absmax constants,
nested constants, bf16 norms), the chunks of its bytes that differ from the client's version:

    <key>.changed  uint8 bitmap, bit i set when chunk i differs (chunks of CHUNK bytes: 32 bytes of
                   packed 4-bit codes are one 64-weight quantization block)
    <key>.bytes    uint8, the changed chunks' new bytes, in order
    <key>.dtype / .shape travel in the safetensors metadata, so the tensor is rebuilt exactly

A tensor that did not change is not sent at all. Applying a delta to the version it was made
against gives the new artifact bit for bit (the same bytes, so the same model as a re-download);
`apply_delta` refuses a delta whose base does not match (a digest of the base travels along).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

CHUNK = 32  # bytes: one 64-weight block of packed 4-bit codes


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)


def base_digest(base: Mapping[str, torch.Tensor], keys) -> str:
    """A digest of the base tensors `keys`: a delta applies only to the version it was made against."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        tensor = base[key]
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_raw(tensor).numpy().tobytes())
    return digest.hexdigest()[:16]


def make_delta(base: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> bytes:
    """The delta from `base` (a superset of `new`'s keys is fine) to `new`, serialized."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    for key in sorted(new):
        after = _raw(new[key])
        old = base.get(key)
        if old is not None and old.dtype == new[key].dtype and tuple(old.shape) == tuple(new[key].shape):  # same layout
            before = _raw(old)
            n = after.numel()
            pad = (-n) % CHUNK
            a = torch.cat([after, after.new_zeros(pad)]).view(-1, CHUNK)
            b = torch.cat([before, before.new_zeros(pad)]).view(-1, CHUNK)
            changed = (a != b).any(dim=1)
            if not changed.any():
                continue
            chunks = a[changed].reshape(-1)
            if pad and changed[-1]:
                chunks = chunks[: chunks.numel() - pad]  # the last chunk travels without its padding
        else:  # new key or new layout: every chunk changed
            changed = torch.ones((after.numel() + CHUNK - 1) // CHUNK, dtype=torch.bool)
            chunks = after
        tensors[key + ".changed"] = _pack_bits(changed)
        tensors[key + ".bytes"] = chunks.clone()
        meta[key] = {"dtype": str(new[key].dtype).removeprefix("torch."), "shape": list(new[key].shape)}
    # "keys" names the whole new artifact: the tensors that did not change come from the base, so
    # the receiver can hand complete modules (every quantization constant) to the model.
    header = {
        "tensors": json.dumps(meta, sort_keys=True),
        "keys": json.dumps(sorted(new)),
        "base": base_digest(base, [k for k in meta if k in base]),
    }
    return save(tensors, metadata=header)


def apply_delta(base: Mapping[str, torch.Tensor], delta: bytes) -> dict[str, torch.Tensor]:
    """The whole new artifact: the tensors the delta changes rebuilt from `base`, the others taken
    from it (ValueError when the delta was made against another base)."""
    from safetensors.torch import load

    tensors = load(delta)
    header = _metadata(delta)
    meta = json.loads(header["tensors"])
    present = [k for k in meta if k in base]
    if base_digest(base, present) != header["base"]:
        raise ValueError("the realignment delta was made against another version of the partial layers than the one held")
    out: dict[str, torch.Tensor] = {}
    for key, info in meta.items():
        dtype, shape = getattr(torch, info["dtype"]), tuple(info["shape"])
        changed = _unpack_bits(tensors[key + ".changed"])
        chunks = tensors[key + ".bytes"]
        old = base.get(key)
        size = torch.empty(shape, dtype=dtype).numel() * torch.empty((), dtype=dtype).element_size()
        raw = (
            _raw(old).clone()
            if old is not None and old.dtype == dtype and tuple(old.shape) == shape
            else torch.zeros(size, dtype=torch.uint8)
        )
        pad = (-size) % CHUNK
        padded = torch.cat([raw, raw.new_zeros(pad)]).view(-1, CHUNK)
        changed = changed[: padded.shape[0]]
        fill = torch.cat([chunks, chunks.new_zeros(int(changed.sum()) * CHUNK - chunks.numel())]).view(-1, CHUNK)
        padded[changed] = fill
        out[key] = padded.reshape(-1)[:size].clone().view(dtype).reshape(shape)
    for key in json.loads(header["keys"]):
        if key not in out:
            if key not in base:
                raise ValueError(f"the realignment delta leaves {key} unchanged, but the held version has no such tensor")
            out[key] = base[key]
    return out


def _metadata(blob: bytes) -> dict:
    """The metadata of a safetensors blob (safetensors' `safe_open` reads files only)."""
    length = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + length]).get("__metadata__", {})


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    padded = torch.cat([bits.to(torch.uint8), torch.zeros((-bits.numel()) % 8, dtype=torch.uint8)]).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (padded * weights).sum(dim=1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return ((packed.view(-1, 1) & weights) != 0).reshape(-1)


def is_delta(blob: bytes) -> bool:
    """Whether a layers message is a delta (`make_delta`) rather than the whole partial layers."""
    return "base" in _metadata(blob) and "tensors" in _metadata(blob)


class HeldLayers(Mapping):
    """The version of the client model's tensors a holder has: its model file (what it downloaded)
    overlaid with every realignment it applied since. Reads the file lazily, tensor by tensor."""

    def __init__(self, weights_file: str | os.PathLike):
        self.weights_file = Path(weights_file)
        self.overrides: dict[str, torch.Tensor] = {}
        self._keys: set[str] | None = None

    def _file_keys(self) -> set[str]:
        if self._keys is None:
            from safetensors import safe_open

            with safe_open(str(self.weights_file), framework="pt") as f:
                self._keys = set(f.keys())
        return self._keys

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.overrides:
            return self.overrides[key]
        if key not in self._file_keys():
            raise KeyError(key)
        from safetensors import safe_open

        with safe_open(str(self.weights_file), framework="pt") as f:
            return f.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self.overrides or key in self._file_keys()

    def __iter__(self):
        return iter(self._file_keys() | set(self.overrides))

    def __len__(self) -> int:
        return len(self._file_keys() | set(self.overrides))

    def update(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.overrides.update({k: v.detach().clone() for k, v in tensors.items()})
