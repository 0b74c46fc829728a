"""A base for server-side optimisers (the FedOpt family of Reddi et al., ICLR 2021).

Each round the server treats the sample-weighted mean client change as a pseudo-gradient and takes
an adaptive step with it:

    delta = sum_k n_k (theta_k - theta) / sum_k n_k
    m     = beta1 * m + (1 - beta1) * delta
    v     = second_moment(v, delta)                 # Adam, Yogi, ... differ only here
    theta = theta + server_lr * m / (sqrt(v) + tau)

m starts at 0 and v at tau^2, as in the paper (no bias correction). m, v and the step count are the
aggregator's state: they go into every checkpoint, so a resumed run continues the same moments.
Subclass it and implement `second_moment` (see plugins/fedadam.py and plugins/fedyogi.py).
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from fedsoda_cli.plugins.contracts import Aggregator


class ServerOptimizer(Aggregator):
    """Adaptive server step over the weighted mean client delta; options server_lr, beta1, beta2, tau."""

    def __init__(self, seed: int = 0, server_lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__(seed)
        if not (server_lr > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
            raise ValueError(f"need server_lr > 0, 0 <= beta1, beta2 < 1 and tau > 0; got {server_lr}, {beta1}, {beta2}, {tau}")
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.steps = 0

    @abstractmethod
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The new second moment from the old one and this round's pseudo-gradient."""

    def aggregate(self, round, global_adapter, updates):
        delta = mean_delta(global_adapter, updates)
        new = {}
        for name, theta in global_adapter.items():
            m = self.m.get(name, torch.zeros_like(delta[name]))
            v = self.v.get(name, torch.full_like(delta[name], self.tau**2))
            self.m[name] = self.beta1 * m + (1 - self.beta1) * delta[name]
            self.v[name] = self.second_moment(v, delta[name])
            step = self.server_lr * self.m[name] / (self.v[name].sqrt() + self.tau)
            new[name] = (theta.double() + step).to(theta.dtype)
        self.steps += 1
        return new

    def state_dict(self):
        return {"steps": self.steps, **{f"m.{k}": t for k, t in self.m.items()}, **{f"v.{k}": t for k, t in self.v.items()}}

    def load_state_dict(self, state):
        self.steps = int(state.get("steps", 0))
        self.m = {k[2:]: t.double() for k, t in state.items() if k.startswith("m.")}
        self.v = {k[2:]: t.double() for k, t in state.items() if k.startswith("v.")}


def mean_delta(global_adapter, updates) -> dict[str, torch.Tensor]:
    """The pseudo-gradient: sample-weighted mean of (theta_k - theta), float64."""
    total = sum(u.num_samples for u in updates)
    weights = [u.num_samples / total if total else 1 / len(updates) for u in updates]
    return {
        name: sum(w * (u.adapter[name].double() - theta.double()) for w, u in zip(weights, updates))
        for name, theta in global_adapter.items()
    }
