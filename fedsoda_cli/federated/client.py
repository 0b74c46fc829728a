"""A client's side of federated fine-tuning: its model, and one round of local training.

`load_client` is the ONE place a client model is built (quantized sub-LLM + LoRA); `train_client`
is a pure function of (model base weights, global adapter, shard, config, seed): it loads the global
adapter into the LoRA modules, builds a fresh optimizer, and never reads anything left over from a
previous client, so clients that share a worker process cannot leak weights into each other.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig

    from fedsoda_cli.federated.messages import ClientResult
    from fedsoda_cli.models.adapters import LoraShape
    from fedsoda_cli.plugins.contracts import AdapterState
    from fedsoda_cli.spec.schema import LoraSpec


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains each round ([federate] keys plus task.max_len)."""

    local_steps: int
    batch_size: int
    lr: float
    optimizer: Literal["adamw", "sgd"]
    max_grad_norm: float
    proximal_mu: float
    max_len: int
    train_eos: bool = True  # data.tasks.trains_eos: loss on the eos after the answer too


def lora_config(lora: LoraSpec | LoraShape, layers: Sequence[int] | None = None, layers_pattern: str = "layers") -> LoraConfig:
    """The PEFT LoRA config of a [lora] section, the one adapters are attached and saved with.
    `layers`: the client model's layer indices that get LoRA (None = all); `layers_pattern` names
    its decoder-layer list (the last part of `models.layers.decoder_layers_path`)."""
    from fedsoda_cli.models.adapters import lora_config as adapters_lora_config

    return adapters_lora_config(lora, layers, layers_pattern=layers_pattern if layers is not None else None)


def load_client(model_dir: Path, lora: LoraSpec | LoraShape, seed: int, layers: Sequence[int] | None = None):
    """The client model of the quantize stage with LoRA attached (on `layers`, client-model
    indices, or on every layer): (peft model, tokenizer).

    LoRA's random init (lora_A) draws from `seed` inside a forked RNG, so every worker builds the
    same initial adapter without touching the process's RNG stream.
    """
    import torch

    from fedsoda_cli.models.adapters import attach_lora
    from fedsoda_cli.models.quantized import load_client_model

    model, tokenizer = load_client_model(model_dir, compute_dtype=torch.float32)  # quantized base, float32 compute
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = attach_lora(model, lora, layers)
    return model, tokenizer


def adapter_state(model) -> AdapterState:
    """The model's LoRA tensors by PEFT name (copies, so later training cannot change them)."""
    from fedsoda_cli.models.adapters import adapter_state as peft_adapter_state

    return peft_adapter_state(model)


def lora_slots(model) -> dict[str, torch.nn.Parameter]:
    """The model's LoRA parameters keyed by their PEFT adapter names. peft's own state-dict
    functions walk every module on each call (~20 ms on a tiny model, per direction, per task), so
    a worker looks the parameters up once and copies adapters in and out of them directly."""
    from peft import get_peft_model_state_dict

    by_storage = {p.data_ptr(): p for p in model.parameters() if p.requires_grad}
    found = {name: by_storage.get(tensor.data_ptr()) for name, tensor in get_peft_model_state_dict(model).items()}
    missing = [name for name, param in found.items() if param is None]
    if missing or len(found) != len(by_storage):
        raise ValueError(f"LoRA tensors and trainable parameters do not match one to one (e.g. {missing[:1]})")
    return {name: param for name, param in found.items() if param is not None}  # all of them: none is missing


def train_client(
    model,
    tokenizer,
    global_adapter: AdapterState,
    shard: Sequence[Any],
    config: LocalTraining,
    seed: int,
    slots: Mapping[str, torch.nn.Parameter] | None = None,
    *,
    round: int = -1,
    client: int = -1,
) -> ClientResult[AdapterState]:
    """Train the global adapter on one client's shard; the result (for task `round`, `client`;
    -1 = outside a federated task) with the trained adapter as tensors, to be `encoded` for the wire.

    Objective per step: SFT cross-entropy on answer tokens (labels from `sft_batch`) plus the
    FedProx proximal term (mu/2) * ||theta - theta_global||^2 over the LoRA tensors. `seed` fixes
    the batch order (numpy) and dropout (torch), so a retried or resumed client repeats exactly.
    Every LoRA tensor is overwritten from `global_adapter` and the optimizer is new, so nothing of
    an earlier client survives. `slots` = `lora_slots(model)`, passed by callers that train often.
    `num_samples` is the number of examples the client trained on this round (local_steps x
    batch_size draws), the work FedAvg weights by default; the shard size goes into
    `metrics["shard_size"]` for `federate.weighting = "shard"`.
    """
    import numpy as np
    import torch

    from fedsoda_cli.data.sft import sft_batch
    from fedsoda_cli.federated.messages import ClientResult, adapter_digest

    slots = slots if slots is not None else lora_slots(model)
    _load_into(slots, global_adapter)
    start_digest = adapter_digest(slots)
    anchors = {name: p.detach().clone() for name, p in slots.items()}  # theta_global, constants
    params = list(slots.values())
    optimizer = _optimizer(config, params)
    order = batch_order(len(shard), config.local_steps * config.batch_size, np.random.default_rng(seed))
    torch.manual_seed(seed)
    model.train()
    losses = []
    started = time.perf_counter()
    for step in range(config.local_steps):
        batch = sft_batch(
            [shard[i] for i in order[step * config.batch_size : (step + 1) * config.batch_size]],
            tokenizer,
            config.max_len,
            eos=config.train_eos,
        )
        sft_loss = model(**batch).loss
        loss = sft_loss + _proximal_term(slots, anchors, config.proximal_mu)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        losses.append(float(sft_loss.detach()))
    seconds = time.perf_counter() - started
    model.eval()
    metrics = {
        "train_loss": float(np.mean(losses)),
        "last_loss": losses[-1],
        "steps": config.local_steps,
        "shard_size": len(shard),
        "step_seconds": seconds / config.local_steps,
    }
    trained = {name: p.detach().clone() for name, p in slots.items()}
    return ClientResult(
        round=round,
        client=client,
        adapter=trained,
        num_samples=len(order),
        metrics=metrics,
        start_digest=start_digest,
        train_seconds=seconds,
    )


def _load_into(slots: Mapping[str, torch.Tensor], adapter: AdapterState) -> None:
    """Overwrite every LoRA parameter with the adapter's tensor of the same name (all must exist)."""
    import torch

    if set(adapter) != set(slots):
        missing, unexpected = sorted(set(slots) - set(adapter)), sorted(set(adapter) - set(slots))
        raise ValueError(f"adapter does not fit the client model (missing {missing[:1]}, unexpected {unexpected[:1]})")
    with torch.no_grad():
        for name, param in slots.items():
            param.copy_(adapter[name])


def _proximal_term(params: Mapping[str, torch.Tensor], anchors: Mapping[str, torch.Tensor], mu: float):
    if mu == 0:
        return 0.0
    return (mu / 2) * sum(((p - anchors[name]) ** 2).sum() for name, p in params.items())


def _optimizer(config: LocalTraining, params: Sequence[torch.Tensor]):
    import torch

    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)


def batch_order(n: int, needed: int, rng) -> list[int]:
    """Example indices for `needed` draws: shuffled passes over the shard, reshuffled every pass."""
    import numpy as np

    passes = -(-needed // n)
    return np.concatenate([rng.permutation(n) for _ in range(passes)])[:needed].tolist()


def apply_realigned_layers(model, payload: bytes) -> None:
    """Swap the server's realigned partial layers (the bytes of a `write_partial_layers` file) into
    a client model in place: quantized linears get the re-quantized weights, LoRA stays."""
    from safetensors.torch import load

    from fedsoda_cli.oda.realign import apply_partial_layers

    apply_partial_layers(model, load(payload))
