"""fedyogi: FedYogi, a server-side Yogi step on the clients' mean update (Reddi et al. 2021).

Like FedAdam (see plugins/fedadam.py for how a third-party aggregator is written), but the second
moment moves additively, by at most (1 - beta2) * delta^2 per round, so it cannot collapse after
a few large updates (Algorithm 2 of "Adaptive Federated Optimization", ICLR 2021):

    delta = sum_k n_k (theta_k - theta) / sum_k n_k
    m     = beta1 * m + (1 - beta1) * delta
    v     = v - (1 - beta2) * delta^2 * sign(v - delta^2)
    theta = theta + server_lr * m / (sqrt(v) + tau)

m, v and the step count are saved in every checkpoint.

How to enable it
----------------
    plugins = ["plugins/fedyogi.py"]

    [federate]
    aggregator = "fedyogi"
    aggregator_options = { server_lr = 0.001, tau = 0.001 }
"""

from __future__ import annotations

import torch

from fedsoda_cli.plugins import Aggregator, aggregators


@aggregators.register("fedyogi")
class FedYogi(Aggregator):
    """Yogi on the server over the weighted mean client delta; options server_lr, beta1, beta2, tau."""

    def __init__(self, seed: int = 0, server_lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__(seed)
        if not (server_lr > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
            raise ValueError(f"need server_lr > 0, 0 <= beta1, beta2 < 1 and tau > 0; got {server_lr}, {beta1}, {beta2}, {tau}")
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.steps = 0

    def aggregate(self, round, global_adapter, updates):
        total = sum(u.num_samples for u in updates)
        weights = [u.num_samples / total if total else 1 / len(updates) for u in updates]
        new = {}
        for name, theta in global_adapter.items():
            delta = sum(w * (u.adapter[name].double() - theta.double()) for w, u in zip(weights, updates))
            m = self.m.get(name, torch.zeros_like(delta))
            v = self.v.get(name, torch.full_like(delta, self.tau**2))
            self.m[name] = self.beta1 * m + (1 - self.beta1) * delta
            self.v[name] = v - (1 - self.beta2) * delta**2 * torch.sign(v - delta**2)
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
