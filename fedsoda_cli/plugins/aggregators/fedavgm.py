"""FedAvgM (Hsu et al. 2019, "Measuring the effects of non-identical data distribution"): FedAvg
with server momentum, which damps the round-to-round swings that label-skewed clients cause.

    delta = sum_k n_k (theta_k - theta) / sum_k n_k     (the FedAvg step, as a pseudo-gradient)
    v     = momentum * v + delta
    theta = theta + server_lr * v

With momentum 0 and server_lr 1 this is FedAvg exactly. The velocity v is the aggregator's state,
saved in every checkpoint, so a resumed run continues with the same momentum.
"""

from __future__ import annotations

import torch

from fedsoda_cli.plugins.contracts import AdapterState, Aggregator, ClientUpdate
from fedsoda_cli.plugins.server_optimizer import mean_delta


class FedAvgM(Aggregator):
    """Server momentum over the weighted mean client delta; options server_lr (1.0), momentum (0.9)."""

    def __init__(self, seed: int = 0, server_lr: float = 1.0, momentum: float = 0.9):
        super().__init__(seed)
        if not (server_lr > 0 and 0 <= momentum < 1):
            raise ValueError(f"need server_lr > 0 and 0 <= momentum < 1; got server_lr = {server_lr}, momentum = {momentum}")
        self.server_lr, self.momentum = server_lr, momentum
        self.velocity: dict[str, torch.Tensor] = {}

    def aggregate(self, round: int, global_adapter: AdapterState, updates: list[ClientUpdate]) -> AdapterState:
        delta = mean_delta(global_adapter, updates)
        new = {}
        for name, theta in global_adapter.items():
            v = self.momentum * self.velocity.get(name, torch.zeros_like(delta[name])) + delta[name]
            self.velocity[name] = v
            new[name] = (theta.double() + self.server_lr * v).to(theta.dtype)
        return new

    def state_dict(self):
        return {f"v.{name}": v for name, v in self.velocity.items()}

    def load_state_dict(self, state):
        self.velocity = {k[2:]: t.double() for k, t in state.items() if k.startswith("v.")}
