"""FedPETuning: LoRA on every layer of the full model, which every client holds."""

from __future__ import annotations

from fedsoda_cli.stages.contract import StageContext, StageResult


def base(ctx: StageContext) -> StageResult:
    """The full LLM as the clients' base, saved like a sub-LLM that kept every layer."""
    from fedsoda_cli.models.layers import decoder_layers
    from fedsoda_cli.models.load import load_causal_lm
    from fedsoda_cli.stages.prune import write_sub_llm

    model, tokenizer = load_causal_lm(ctx.spec.model)
    num_layers = len(decoder_layers(model))
    params = sum(p.numel() for p in model.parameters())
    return write_sub_llm(ctx, model, tokenizer, [], num_layers, params, "none (full model)")


def federate(ctx: StageContext) -> StageResult:
    """The federated rounds with realignment off: there is no sub-LLM to realign."""
    from fedsoda_cli.baselines.overrides import with_overrides
    from fedsoda_cli.stages.federate import run

    return run(with_overrides(ctx, federate={"realign_every": 0}))
