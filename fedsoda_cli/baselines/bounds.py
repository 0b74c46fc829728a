"""The reference runs every federated result is read against, on fedsoda's own client model.

- central (the upper bound): all clients' data pooled on one client that does the federation's
  whole budget: the same rounds, and each round the steps of all sampled clients together
  (clients_per_round x local_steps of batch_size examples), so the same optimizer steps and
  examples in all. Realignment runs as in fedsoda.

The client model (prune, align, quantize) is fedsoda's, so only the federation differs.
"""

from __future__ import annotations

from fedsoda_cli.pipeline import StageContext, StageResult


def central(ctx: StageContext) -> StageResult:
    """One client holding every training example, with the federation's total steps each round."""
    from fedsoda_cli.baselines.overrides import with_overrides
    from fedsoda_cli.federated.stage import run

    fed = ctx.spec.federate
    pooled = {"clients": 1, "clients_per_round": 1, "min_clients": 1, "workers": 1, "partition": "iid",
              "local_steps": fed.local_steps * fed.clients_per_round}
    return run(with_overrides(ctx, federate=pooled))
