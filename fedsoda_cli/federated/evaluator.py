"""Per-round evaluation on the server (`federate.eval_every`): is the global adapter learning?

The server scores the global adapter on `task.val_examples` validation examples, carved from the
training split's unused examples (so never trained on, and never the split `eval` reports), on the
targets of `federate.eval_targets`:
  sub     the client model the adapter is trained on, with the partial layers the clients hold now
  plugin  the full LLM with the adapter mapped onto it through the layer map, as trained (plug-in
          scale 1: `eval.plugin_scale` is the eval stage's, so a change of it never reruns federate)
Each target records accuracy with its 95 % interval, the share of each predicted label (a model
that predicts one label for everything shows it here before the final eval does) and the eval loss:
the mean negative log-likelihood of the gold label word (classification), None for generation.

The models load once, on first use; each evaluation only swaps adapter tensors in.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsoda_cli.round_record import EvalEntry

if TYPE_CHECKING:
    import torch

    from fedsoda_cli.models.layer_map import LayerMap
    from fedsoda_cli.plugins.contracts import AdapterState
    from fedsoda_cli.spec import Spec


class ServerEvaluator:
    def __init__(
        self,
        spec: Spec,
        client_model_dir: Path,
        layer_map_path: Path,
        peft_config,
        lora_layers: Sequence[int] | None,
        examples: list,
        targets: Sequence[str],
    ):
        if not examples:
            raise ValueError("no validation examples")
        self.spec, self.client_model_dir, self.layer_map_path = spec, client_model_dir, layer_map_path
        self.peft_config, self.lora_layers, self.examples, self.targets = peft_config, lora_layers, examples, list(targets)
        self._sub: tuple[Any, Any, dict[str, torch.nn.Parameter]] | None = None  # (peft model, tokenizer, LoRA slots)
        self._full: tuple[Any, Any, LayerMap] | None = None  # (full model, tokenizer, layer map)
        self._layers_applied: bytes | None = None

    def evaluate(self, round: int, global_adapter: AdapterState, realign_layers: bytes | None) -> dict[str, EvalEntry]:
        import torch

        # Loading models draws from torch's global RNG (LoRA init, missing-key init); the server's RNG
        # state goes into every checkpoint, so evaluating must leave it as it was.
        with torch.random.fork_rng(devices=[]):
            return self._evaluate(global_adapter, realign_layers)

    def _evaluate(self, global_adapter: AdapterState, realign_layers: bytes | None) -> dict[str, EvalEntry]:
        results = {}
        for target in self.targets:
            started = time.perf_counter()
            score = self._score_sub(global_adapter, realign_layers) if target == "sub" else self._score_plugin(global_adapter)
            results[target] = summarize(score, self.examples, round_s(time.perf_counter() - started))
        return results

    def _score_sub(self, adapter: AdapterState, realign_layers: bytes | None):
        from fedsoda_cli.federated.client import _load_into, apply_realigned_layers, load_client, lora_slots

        if self._sub is None:
            model, tokenizer = load_client(self.client_model_dir, self.spec.lora, 0, self.lora_layers)
            self._sub = (model, tokenizer, lora_slots(model))
        model, tokenizer, slots = self._sub
        if realign_layers is not None and realign_layers is not self._layers_applied:
            apply_realigned_layers(model, realign_layers)
            self._layers_applied = realign_layers
        _load_into(slots, adapter)
        model.eval()
        return self._score(model, tokenizer)

    def _score_plugin(self, adapter: AdapterState):
        from fedsoda_cli.evaluation.targets import layer_map_for, load_full, plugin_model

        if self._full is None:
            model, tokenizer = load_full(self.spec)
            self._full = (model, tokenizer, layer_map_for(self.spec, self.layer_map_path, model))
        model, tokenizer, layer_map = self._full
        with plugin_model(model, adapter, self.peft_config, layer_map) as plugged:
            return self._score(plugged, tokenizer)

    def _score(self, model, tokenizer):
        from fedsoda_cli.evaluation.task import evaluate_for_spec

        return evaluate_for_spec(self.spec, model, tokenizer, self.examples)


def summarize(score, examples: list, seconds: float) -> EvalEntry:
    """The EvalEntry of a TaskScore over `examples` (its predictions are in example order), scored in
    `seconds`; label_shares and loss are None for generation tasks."""
    summary = score.summary()
    pairs = [(e, p) for e, p in zip(examples, score.predictions) if p.scores is not None and e.label is not None]
    shares = None
    if pairs:
        counts = Counter(p.prediction for _, p in pairs)
        shares = {label: counts[label] / len(pairs) for label in sorted(counts)}
    loss = score.label_word_loss(examples)
    return EvalEntry(
        accuracy=summary["accuracy"],
        ci95=summary["ci95"],
        correct=summary["correct"],
        count=summary["count"],
        label_shares=shares,
        loss=loss,
        seconds=seconds,
    )


def round_s(seconds: float) -> float:
    return float(f"{seconds:.4g}")
