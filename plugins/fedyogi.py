"""fedyogi: FedYogi, a server-side Yogi step on the clients' mean update (Reddi et al. 2021).

Like FedAdam (see plugins/fedadam.py for how a third-party aggregator is written), but the second
moment moves additively, by at most (1 - beta2) * delta^2 per round, so it cannot collapse after
a few large updates (Algorithm 2 of "Adaptive Federated Optimization", ICLR 2021):

    v = v - (1 - beta2) * delta^2 * sign(v - delta^2)

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

from fedsoda_cli.plugins import aggregators
from fedsoda_cli.plugins.server_optimizer import ServerOptimizer


@aggregators.register("fedyogi")
class FedYogi(ServerOptimizer):
    """Yogi on the server over the weighted mean client delta; options server_lr, beta1, beta2, tau."""

    def second_moment(self, v, delta):
        return v - (1 - self.beta2) * delta**2 * torch.sign(v - delta**2)
