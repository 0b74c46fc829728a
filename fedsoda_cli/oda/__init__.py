"""Orchestrated distillation alignment (ODA), the library: the loss, the partial-layer training
loop and its measurements (`distill.py`), and intermittent realignment with the global adapter
attached (`realign.py`). The align, quantize and realign stages, the federated runtime and
evaluation use it."""
