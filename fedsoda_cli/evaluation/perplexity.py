"""Perplexity on held-out public text: exp of the mean next-token negative log-likelihood.

In: equal-length token windows [n, T] (fedsoda_cli.data.public_sequences, no padding). Every
window predicts its tokens 1..T-1 from the ones before; the mean runs over all n*(T-1) predictions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # number of predicted tokens


@torch.no_grad()
def perplexity(model, sequences: torch.Tensor, *, batch_size: int, advance: Callable[[int], None] | None = None) -> Perplexity:
    """exp(mean NLL) of `sequences` (LongTensor [n, T], T >= 2) under `model`; `advance(k)` per batch."""
    if sequences.ndim != 2 or sequences.shape[1] < 2:
        raise ValueError(f"need token windows [n, T>=2], got shape {tuple(sequences.shape)}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, sequences.shape[0], batch_size):
        batch = sequences[start : start + batch_size]
        logits = model(input_ids=batch.to(device), use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1).to(device), reduction="sum"
        )
        total += float(nll)
        count += batch[:, 1:].numel()
        if advance:
            advance(batch.shape[0])
    mean = total / count
    return Perplexity(perplexity=math.exp(mean), nll=mean, tokens=count)
