"""ODA intermittent realignment, the library: the align step again, with the current global LoRA
adapter attached to both models; only the partial layers' base weights change, and those layers
alone are re-quantized and broadcast to the clients.

Used by the federated runtime every r rounds, by the on-demand realign stage
(`fedsoda_cli/stages/realign.py`, `fedsoda realign SPEC --adapter DIR`) and by evaluation:
    result = realign(teacher_full, student_sub, adapter_state_sub, kept, removed_groups, batches,
                     config=spec.align, lora=lora_spec, steps=spec.realign.steps)
    nbytes = write_partial_layers(result.partial_layer_state, spec.quantize, path)  # communication
    apply_partial_layers(client_model, path)                                        # on each client
`student_sub` is the server's float master copy; its partial layers are updated in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedsoda_cli.models.adapters import LoraShape
from fedsoda_cli.spec.schema import AlignSpec, LoraSpec, ModelSpec, PublicDataSpec, QuantizeSpec

if TYPE_CHECKING:
    from fedsoda_cli.spec import Spec

PARTIAL_LAYERS = "partial_layers.safetensors"
PARTIAL_LAYERS_FLOAT = "partial_layers.float.safetensors"


@dataclass(frozen=True)
class RealignConfig:
    """What the federated runtime's realignment (`federated/realigner.ServerRealigner`) reads of a
    spec, and nothing more; `from_spec` is the one place it is built."""

    model: ModelSpec  # the full LLM: the teacher
    align: AlignSpec  # the ODA loss, partial layers, batch size, quant_aware
    lora: LoraShape
    quantize: QuantizeSpec  # how the client model stores the realigned layers
    public_data: PublicDataSpec  # the public-text windows realignment trains and measures on
    template: str | None  # the task prompt the training text is poured into (align.text), None = plain
    data_dir: Path | None  # where that text is (None = the Hugging Face hub)
    steps: int  # realign.steps
    seed: int  # run.seed: each realignment's batches and dropout derive from (seed, round)
    drift_sequences: int  # federate.drift_sequences

    @classmethod
    def from_spec(cls, spec: Spec) -> RealignConfig:
        from fedsoda_cli.data.paths import resolve_data_dir
        from fedsoda_cli.data.public import alignment_template
        from fedsoda_cli.spec import spec_dir

        return cls(
            model=spec.model,
            align=spec.align,
            lora=LoraShape.from_spec(spec.lora),
            quantize=spec.quantize,
            public_data=spec.public_data,
            template=alignment_template(spec),
            data_dir=resolve_data_dir(spec.data, spec_dir(spec)),
            steps=spec.realign.steps,
            seed=spec.run.seed,
            drift_sequences=spec.federate.drift_sequences,
        )


@dataclass
class RealignResult:
    """The new float base weights of the partial layers, keyed as in the sub-LLM's state dict
    (e.g. "model.layers.7.mlp.up_proj.weight"), and the run's metrics."""

    partial_layer_state: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)


def realign(
    teacher_full,
    student_sub,
    adapter_state_sub: dict[str, torch.Tensor],
    kept: list[int],
    removed_groups: list[list[int]],
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    config: AlignSpec,
    lora: LoraSpec | LoraShape,
    steps: int,
    heldout_ids: torch.Tensor | None = None,
    quant: QuantizeSpec | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> RealignResult:
    """Attach the global adapter to the student and, mapped through `kept`, to the teacher (as
    frozen LoRA modules, not merged), train the partial layers' base weights with the ODA loss for
    `steps` steps, detach the adapters again and return the partial layers' new weights. Both
    models come back without LoRA; the student's partial layers are updated in place. With `quant`
    the student trains as the client model of that format (`align.quant_aware`, as in align). With
    `heldout_ids`, KL/NMSE/perplexity (adapter attached) are measured before and after, in bf16 and
    as deployed: metrics "before"/"after" (bf16), "measured" (the four variants), "warnings"."""
    from fedsoda_cli.models.layers import decoder_layers_path
    from fedsoda_cli.oda.distill import align_partial_layers, measure, partial_layers

    partial = partial_layers(config.partial, kept, removed_groups)
    layers_path = decoder_layers_path(student_sub)
    with adapter_on_both(teacher_full, student_sub, adapter_state_sub, kept, lora) as (teacher, student):

        def measured():
            if heldout_ids is None:
                return None
            return measure(teacher, student, kept, removed_groups, heldout_ids, config, quant, partial)

        before = measured()
        history = align_partial_layers(
            teacher, student, kept, removed_groups, config.partial, batches, config, steps, quant=quant, progress=progress
        )
        after = measured()
    state = partial_layer_state(student_sub, partial, layers_path)
    metrics = {"steps": len(history), "partial_layers": [kept[k] for k in partial], "history": history}
    if heldout_ids is not None:
        from fedsoda_cli.oda.distill import regressions

        variants = {
            "before_bf16": before["bf16"],
            "after_bf16": after["bf16"],
            "deployed_before": before["deployed"],
            "deployed_after": after["deployed"],
        }
        metrics.update(
            before=before["bf16"],
            after=after["bf16"],
            measured=variants,
            warnings=regressions([("bf16", before["bf16"], after["bf16"]), ("deployed", before["deployed"], after["deployed"])]),
        )
    return RealignResult(state, metrics)


def adapter_drift(
    teacher_full,
    student_sub,
    adapter_state_sub: dict[str, torch.Tensor],
    kept: list[int],
    removed_groups: list[list[int]],
    ids: torch.Tensor,
    *,
    config: AlignSpec,
    lora: LoraSpec | LoraShape,
    quant: QuantizeSpec,
) -> dict[str, Any]:
    """How far the client model with the global adapter has drifted from the full LLM with the
    adapter mapped through `kept`: `evaluate_alignment` (KL, hidden NMSE, perplexities) of the
    student as deployed (its frozen layers in `quant`, see `deployed_view`) on the windows `ids`.
    Both models come back without LoRA and unchanged."""
    from fedsoda_cli.oda.distill import deployed_view, evaluate_alignment, partial_layers

    partial = partial_layers(config.partial, kept, removed_groups)
    with adapter_on_both(teacher_full, student_sub, adapter_state_sub, kept, lora) as (teacher, student):
        with torch.no_grad(), deployed_view(student, quant, config, partial):
            return evaluate_alignment(teacher, student, kept, removed_groups, ids, config)


@contextmanager
def adapter_on_both(
    teacher_full, student_sub, adapter_state_sub: dict[str, torch.Tensor], kept: list[int], lora: LoraSpec | LoraShape
):
    """(teacher, student) with the global adapter attached as frozen LoRA modules, not merged: as
    is to the student, mapped through `kept` to the teacher. Both come back without LoRA."""
    from fedsoda_cli.models.adapters import attach_lora, load_adapter_state, sub_to_full_adapter
    from fedsoda_cli.models.layers import decoder_layers_path

    student = attach_lora(student_sub, lora)
    try:
        teacher = attach_lora(teacher_full, lora, layers=kept)
        try:
            load_adapter_state(student, adapter_state_sub)
            load_adapter_state(
                teacher, sub_to_full_adapter(adapter_state_sub, kept, layers_path=decoder_layers_path(teacher_full))
            )
            yield teacher, student
        finally:
            teacher.unload()
    finally:
        student.unload()


def broadcast_format(align: AlignSpec, quant: QuantizeSpec) -> QuantizeSpec:
    """The format the partial layers travel and live in on the client: `quant`, or bf16 when the
    client keeps them in bf16 (quant_aware = "bf16_partial")."""
    return quant.model_copy(update={"quant_type": "none"}) if align.quant_aware == "bf16_partial" else quant


def partial_layer_state(model, partial: list[int], layers_path: str) -> dict[str, torch.Tensor]:
    """Float copies of every parameter of the decoder layers `partial` (sub-LLM indices)."""
    layers = model.get_submodule(layers_path)
    return {f"{layers_path}.{k}.{name}": p.detach().clone() for k in partial for name, p in layers[k].named_parameters()}


def partial_layer_artifact(partial_layer_state: dict[str, torch.Tensor], quant: QuantizeSpec) -> dict[str, torch.Tensor]:
    """The partial layers as the client model stores them: linear weights (2-D `.weight` inside a
    decoder layer) quantized to `quant.quant_type` exactly as the quantize stage does, everything
    else (norms, biases) bf16."""
    from fedsoda_cli.models.quantized import quantize_linear_weight

    out: dict[str, torch.Tensor] = {}
    for key, tensor in partial_layer_state.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and tensor.ndim == 2:
            for rel, value in quantize_linear_weight(tensor, quant.quant_type, quant.double_quant).items():
                out[f"{module}.{rel}"] = value
        else:
            out[key] = tensor.detach().to(torch.bfloat16).contiguous()
    return out


def write_partial_layers(partial_layer_state: dict[str, torch.Tensor], quant: QuantizeSpec, path: str | os.PathLike) -> int:
    """Re-quantize the partial layers and write them alone to `path` (safetensors); returns its
    size in bytes, which is what broadcasting them to one client costs."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(partial_layer_artifact(partial_layer_state, quant), path, metadata={"format": "pt", "quant_type": quant.quant_type})
    return path.stat().st_size


def apply_partial_layers(client_model, artifact: str | os.PathLike | dict[str, torch.Tensor]) -> list[str]:
    """Swap the realigned layers of `artifact` (a file from `write_partial_layers`, or its
    tensors) into a client model in place (a LoRA-wrapped one too: adapters are kept). Returns the
    module paths replaced."""
    from safetensors.torch import load_file

    from fedsoda_cli.models.quantized import set_module_tensors

    tensors = artifact if isinstance(artifact, dict) else load_file(str(artifact))
    return set_module_tensors(client_model, tensors)
