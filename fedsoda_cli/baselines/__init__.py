"""The baselines the method is measured against, as pipelines of the same tool (`run.method`).

- fedpetuning: no prune, align or realign; clients hold the full model (bf16, or NF4 when the spec
  quantizes) and exchange LoRA adapters of all layers.
- fedot (offsite-tuning): the emulator is a uniform drop of middle layers, distilled once; the bottom
  and top `fedot.adapter_layers` layers carry the trainable adapter; no realignment.
- central: the upper bound, fedsoda's client model trained on all clients' data pooled (bounds.py).
- local: the lower bound, every client training alone on its shard (bounds.py).

Everything else (data, LoRA rank, clients, rounds, local steps, learning rate) comes from the same
spec keys as fedsoda, so one spec switch changes only the method.
"""

from fedsoda_cli import pipeline
from fedsoda_cli.baselines import bounds, fedot, fedpetuning

_SOURCES = ("model", "data")

pipeline.register_pipeline("fedpetuning", (
    pipeline.Stage("base", (), _SOURCES, "fedsoda_cli.baselines.fedpetuning:base"),
    pipeline.Stage("quantize", ("base",), (*_SOURCES, "public_data", "quantize"), "fedsoda_cli.stages.quantize:run"),
    pipeline.Stage("federate", ("quantize",), pipeline.FEDERATE.sections, "fedsoda_cli.baselines.fedpetuning:federate"),
    pipeline.EVAL,
))

pipeline.register_pipeline("fedot", (
    pipeline.Stage("prune", (), (*_SOURCES, "fedot"), "fedsoda_cli.baselines.fedot:emulator"),
    pipeline.Stage("align", ("prune",), (*pipeline.ALIGN.sections, "fedot"), "fedsoda_cli.baselines.fedot:align"),
    pipeline.QUANTIZE,
    pipeline.Stage("federate", ("quantize",), (*pipeline.FEDERATE.sections, "fedot"), "fedsoda_cli.baselines.fedot:federate"),
    pipeline.EVAL,
))

pipeline.register_pipeline("central", (
    pipeline.PROFILE, pipeline.PRUNE, pipeline.ALIGN, pipeline.QUANTIZE,
    pipeline.Stage("federate", ("quantize",), pipeline.FEDERATE.sections, "fedsoda_cli.baselines.bounds:central"),
    pipeline.EVAL,
))

pipeline.register_pipeline("local", (
    pipeline.PROFILE, pipeline.PRUNE, pipeline.ALIGN, pipeline.QUANTIZE,
    pipeline.Stage("federate", ("quantize",), pipeline.FEDERATE.sections, "fedsoda_cli.baselines.bounds:local"),
    pipeline.Stage("eval", ("federate", "quantize"), pipeline.EVAL.sections, "fedsoda_cli.baselines.bounds:local_eval"),
))

__all__ = ["bounds", "fedot", "fedpetuning"]
