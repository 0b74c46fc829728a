"""Checks on what crosses into the server: client updates before aggregation, the aggregate after.

A client update is untrusted input: `check_update` returns the reason to exclude it (or None), so
one broken or malicious client costs the round one update, never the run. An aggregator is the
user's code: `check_aggregate` raises a PluginError naming it when its output is malformed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsoda_cli.errors import PluginError

if TYPE_CHECKING:
    from fedsoda_cli.plugins.contracts import AdapterState


def check_update(global_adapter: AdapterState, update: AdapterState, max_update_norm: float) -> str | None:
    """Why `update` must be excluded, or None if it is usable.

    Rejects missing or unexpected tensor names, wrong shapes or dtypes, NaN/Inf values, and an
    L2 distance ||update - global|| (over all tensors) above `max_update_norm`.
    """
    import torch

    missing = sorted(set(global_adapter) - set(update))
    if missing:
        return f"missing {len(missing)} adapter tensor(s), e.g. {missing[0]}"
    unexpected = sorted(set(update) - set(global_adapter))
    if unexpected:
        return f"unexpected adapter tensor(s), e.g. {unexpected[0]}"
    squared = 0.0
    for name, reference in global_adapter.items():
        tensor = update[name]
        if tensor.shape != reference.shape:
            return f"{name} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}"
        if tensor.dtype != reference.dtype:
            return f"{name} has dtype {tensor.dtype}, expected {reference.dtype}"
        if not torch.isfinite(tensor).all():
            return f"{name} contains NaN or Inf"
        squared += float(torch.linalg.vector_norm(tensor - reference, dtype=torch.float64)) ** 2
    norm = squared**0.5
    if norm > max_update_norm:
        return f"update norm {norm:.3g} exceeds federate.max_update_norm = {max_update_norm:g}"
    return None


def check_aggregate(aggregator: str, global_adapter: AdapterState, new: object) -> AdapterState:
    """`new` if it is a proper adapter (the global adapter's names, shapes, dtypes; finite), else a
    PluginError naming the aggregator and what is wrong."""
    import torch

    where = f"aggregator '{aggregator}' returned"
    fix = "fix the plugin's aggregate() (it must return the global adapter's tensors, updated)"
    if not isinstance(new, dict):
        raise PluginError(f"{where} a {type(new).__name__}, not a dict of tensors; {fix}")
    missing, unexpected = sorted(set(global_adapter) - set(new)), sorted(set(new) - set(global_adapter))
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise PluginError(f"{where} {'no' if missing else 'an unexpected'} tensor {name!r}; {fix}")
    for name, reference in global_adapter.items():
        tensor = new[name]
        if not isinstance(tensor, torch.Tensor):
            raise PluginError(f"{where} a {type(tensor).__name__} for {name!r}, not a tensor; {fix}")
        if tensor.shape != reference.shape or tensor.dtype != reference.dtype:
            raise PluginError(
                f"{where} {name!r} as {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(reference.shape)} {reference.dtype}; {fix}"
            )
        if not torch.isfinite(tensor).all():
            raise PluginError(f"{where} NaN or Inf in {name!r}; {fix}")
    return new
