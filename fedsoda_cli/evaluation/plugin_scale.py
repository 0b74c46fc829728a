"""How strongly the global adapter is plugged into the full LLM: the plug-in scale s of the plugin
target (`eval.plugin_scale`), W + s (alpha / r) B A.

The adapter is trained on the client model; on the full LLM only part of it transfers, and part of
what a client model 9 layers short had to learn (the answer format it lacked) overshoots on a model
that already has it, as a label bias (measured: BENCHMARKS.md, "Plugging in at a scale"). s = 1 is the
method's plug-in. `"val"` lets the server choose s from `eval.plugin_scales` on the task's validation
slice (the one federate's per-round evaluation scores, carved from the training split's unused
examples, never the eval split), the way a weight interpolation between the zero-shot and the tuned
model is chosen on held-out data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedsoda_cli.models.layer_map import LayerMap


@dataclass
class Candidate:
    """One plug-in scale as scored on the validation slice."""

    scale: float
    accuracy: float
    correct: int
    count: int
    loss: float | None


@dataclass
class ScaleChoice:
    """The plug-in scale the plugin target uses, and how it was chosen: from the spec (`"spec"`) or
    on the validation slice (`"val"`, with every candidate's score)."""

    scale: float
    chosen_on: str
    candidates: list[Candidate] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"scale": self.scale, "chosen_on": self.chosen_on, "candidates": [asdict(c) for c in self.candidates]}


def best(candidates: list[Candidate]) -> Candidate:
    """The highest validation accuracy; ties go to the lower label-word loss, then the larger scale
    (the nearer to the adapter as trained)."""
    return max(candidates, key=lambda c: (c.correct, -c.loss if c.loss is not None else 0.0, c.scale))


def choose(spec, full_model, tokenizer, sub_adapter: Path, layer_map: LayerMap, bar=None) -> ScaleChoice:
    """The plug-in scale of `spec.eval.plugin_scale`; for `"val"`, each of `spec.eval.plugin_scales` is
    written as a plugin adapter, loaded into `full_model` with stock PEFT, scored on the validation
    slice and taken out again (`full_model` is unchanged on return). `bar`: a rich Progress to show it on."""
    from fedsoda_cli.data.tasks import validation_slice
    from fedsoda_cli.evaluation.targets import plugged
    from fedsoda_cli.evaluation.task import evaluate_for_spec

    setting = spec.eval.plugin_scale
    if setting != "val":
        return ScaleChoice(float(setting), "spec")
    examples = validation_slice(spec, 'eval.plugin_scale = "val"', "set eval.plugin_scale to a number")
    scales = spec.eval.plugin_scales
    task = bar.add_task("plugin scale", total=len(examples) * len(scales), status="validation") if bar is not None else None
    candidates = []
    advance = (lambda k: bar.advance(task, k)) if bar is not None else None
    for scale in scales:
        with plugged(full_model, sub_adapter, layer_map, scale=scale) as model:  # full_model as it was after
            score = evaluate_for_spec(spec, model, tokenizer, examples, advance=advance)
        candidates.append(Candidate(scale, score.accuracy, score.correct, score.count, score.label_word_loss(examples)))
    return ScaleChoice(best(candidates).scale, "val", candidates)
