"""fedadam: FedAdam, a server-side Adam step on the clients' mean update (Reddi et al. 2021).

A worked example of a third-party aggregator with server state, built on fedsoda's
`ServerOptimizer` base (fedsoda_cli/plugins/server_optimizer.py), which takes an adaptive step with
the sample-weighted mean client change as a pseudo-gradient (Algorithm 2 of "Adaptive Federated
Optimization", ICLR 2021). Adam's second moment is an exponential average of delta^2:

    v = beta2 * v + (1 - beta2) * delta^2

m, v and the step count are the aggregator's state: they go into every checkpoint, so a resumed
run continues the same moments.

How a third party writes one
----------------------------
    from fedsoda_cli.plugins import Aggregator, aggregators

    @aggregators.register("my-aggregator")
    class MyAggregator(Aggregator):
        def aggregate(self, round, global_adapter, updates):   # dict name->tensor, [ClientUpdate]
            ...                                               # -> dict name->tensor, same shapes
        def state_dict(self): ...          # tensors and JSON values, saved in each checkpoint
        def load_state_dict(self, state): ...

`updates` holds only validated updates (finite, right names and shapes). fedsoda checks what
`aggregate` returns and names the aggregator if it is wrong.

How to enable it
----------------
In the experiment spec (paths relative to the spec file):

    plugins = ["plugins/fedadam.py"]

    [federate]
    aggregator = "fedadam"
    aggregator_options = { server_lr = 0.001, tau = 0.001 }
"""

from __future__ import annotations

from fedsoda_cli.plugins import aggregators
from fedsoda_cli.plugins.server_optimizer import ServerOptimizer


@aggregators.register("fedadam")
class FedAdam(ServerOptimizer):
    """Adam on the server over the weighted mean client delta; options server_lr, beta1, beta2, tau."""

    def second_moment(self, v, delta):
        return self.beta2 * v + (1 - self.beta2) * delta**2
