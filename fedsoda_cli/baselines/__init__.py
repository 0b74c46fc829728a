"""The baselines the method is measured against, as pipelines of the same tool (`run.method`).

- fedpetuning: no prune, align or realign; clients hold the full model (bf16, or NF4 when the spec
  quantizes) and exchange LoRA adapters of all layers.
- fedot (offsite-tuning): the emulator is a uniform drop of middle layers, distilled once; the bottom
  and top `fedot.adapter_layers` layers carry the trainable adapter; no realignment.
- central: the upper bound, fedsoda's client model trained on all clients' data pooled (bounds.py).
- local: the lower bound, every client training alone on its shard (bounds.py).

Everything else (data, LoRA rank, clients, rounds, local steps, learning rate) comes from the same
spec keys as fedsoda, so one spec switch changes only the method. Their stage lists are in
`fedsoda_cli/pipeline.py` beside fedsoda's; the stage functions here follow the stage contract.
"""
