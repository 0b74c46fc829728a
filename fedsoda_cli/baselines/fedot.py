"""FedOT (offsite-tuning): clients train the bottom and top k layers of an emulator.

The emulator keeps the bottom and top `fedot.adapter_layers` layers whole and drops a uniform
stride of `fedot.drop_ratio` of the middle layers; the remaining middle layers are distilled once
toward the full LLM (the same ODA loss as fedsoda's align, on all middle layers), and the LoRA
adapter sits only on the bottom and top layers. There is no realignment.
"""

from __future__ import annotations

from fedsoda_cli.errors import SpecError
from fedsoda_cli.stages.contract import StageContext, StageResult


def dropped_middle_layers(num_layers: int, adapter_layers: int, drop_ratio: float) -> list[int]:
    """Original indices of the middle layers the emulator drops, evenly spaced."""
    middle = list(range(adapter_layers, num_layers - adapter_layers))
    count = round(drop_ratio * len(middle))
    if not middle or count == 0 or count >= len(middle):
        raise SpecError(
            f"fedot.adapter_layers = {adapter_layers} and fedot.drop_ratio = {drop_ratio} leave no middle layers "
            f"to drop or keep in a {num_layers}-layer model; lower fedot.adapter_layers or change fedot.drop_ratio"
        )
    stride = len(middle) / count
    return sorted({middle[int(i * stride + stride / 2)] for i in range(count)})


def adapter_layers(num_layers: int, k: int) -> list[int]:
    """The bottom and top k original layers: where FedOT's trainable adapter lives."""
    return [*range(k), *range(num_layers - k, num_layers)]


def emulator(ctx: StageContext) -> StageResult:
    """Drop the middle layers uniformly and save the emulator like a sub-LLM."""
    from fedsoda_cli.models.layers import decoder_layers, drop_layers
    from fedsoda_cli.models.load import load_causal_lm
    from fedsoda_cli.stages.prune import write_sub_llm

    model, tokenizer = load_causal_lm(ctx.spec.model)
    num_layers = len(decoder_layers(model))
    params = sum(p.numel() for p in model.parameters())
    removed = dropped_middle_layers(num_layers, ctx.spec.fedot.adapter_layers, ctx.spec.fedot.drop_ratio)
    drop_layers(model, removed)
    return write_sub_llm(ctx, model, tokenizer, [[layer] for layer in removed], num_layers, params, "fedot uniform emulator")


def align(ctx: StageContext) -> StageResult:
    """Distil every kept middle layer of the emulator (the adapter layers stay as they are)."""
    from fedsoda_cli.baselines.overrides import with_overrides
    from fedsoda_cli.models.layer_map import LAYER_MAP, read_layer_map
    from fedsoda_cli.stages import align as align_stage

    layer_map = read_layer_map(ctx.inputs["prune"] / LAYER_MAP)
    ends = set(adapter_layers(layer_map.num_layers, ctx.spec.fedot.adapter_layers))
    middle = [layer for layer in layer_map.kept if layer not in ends]
    return align_stage.run(with_overrides(ctx, align={"partial": middle}))


def federate(ctx: StageContext) -> StageResult:
    """The federated rounds with LoRA on the bottom and top k layers only, and no realignment."""
    from fedsoda_cli.baselines.overrides import with_overrides
    from fedsoda_cli.models.layer_map import LAYER_MAP, read_layer_map
    from fedsoda_cli.stages.federate import run

    num_layers = read_layer_map(ctx.inputs["quantize"] / LAYER_MAP).num_layers
    layers = adapter_layers(num_layers, ctx.spec.fedot.adapter_layers)
    return run(with_overrides(ctx, federate={"realign_every": 0}, lora={"layers": layers}))
