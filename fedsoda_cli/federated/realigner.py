"""The server's intermittent realignment (ODA), as the round loop's `Realigner`.

Every r rounds the server distils the partial layers of its float sub-LLM master copy (the align
stage's model/) toward the full LLM, with the current global adapter attached to both
(`fedsoda_cli.oda.realign.realign`), re-quantizes those layers as the client model stores them
and returns them as the bytes every client downloads. The master copy's partial layers carry over
from one realignment to the next: they are this object's state, saved in each checkpoint.

The teacher, the master copy and the public text are loaded on the first realignment (or resume),
so a run that never reaches round r never pays for them.

Like align, realignment is quantization-aware (`align.quant_aware`: the frozen layers as clients
hold them) and measured on the held-out windows before and after, in bf16 and as deployed (adapter
attached). Each realignment's measurements go into `history` and, with `log_path`, one JSON line
each; a number that got worse is listed under "warnings" there and logged as a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsoda_cli.errors import ArtifactError
from fedsoda_cli.seeding import stable_seed

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from fedsoda_cli.models.layer_map import LayerMap
    from fedsoda_cli.oda.realign import RealignConfig
    from fedsoda_cli.plugins.contracts import AdapterState


@dataclass
class _Loaded:
    """What realignment works with, loaded on first use: the full LLM, the float sub-LLM master
    copy, and the public text's training and held-out windows."""

    teacher: PreTrainedModel
    student: PreTrainedModel
    public_ids: torch.Tensor
    heldout_ids: torch.Tensor


class ServerRealigner:
    """Realigns with the full LLM of `config.model` and the float sub-LLM in `align_model_dir`;
    `config` = `RealignConfig.from_spec(spec)`, the spec keys it reads."""

    def __init__(self, config: RealignConfig, align_model_dir: Path, layer_map: LayerMap, log_path: Path | None = None):
        if not (Path(align_model_dir) / "config.json").is_file():
            raise ArtifactError(
                f"{align_model_dir}: realignment needs the align stage's float sub-LLM; rerun `fedsoda align SPEC`"
            )
        self.config, self.align_model_dir = config, Path(align_model_dir)
        self.kept, self.removed_groups = layer_map.kept, layer_map.removed_groups
        self.loaded: _Loaded | None = None
        self.log_path = Path(log_path) if log_path is not None else None
        self.partial_state: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []

    def realign(self, round: int, global_adapter: AdapterState) -> bytes:
        """Realign the master copy for `config.steps` (realign.steps) steps; the partial layers as client bytes.
        Batches and dropout derive from (run.seed, round), so a resumed run realigns identically."""
        import torch
        from safetensors.torch import save

        from fedsoda_cli.oda.distill import seeded_batches
        from fedsoda_cli.oda.realign import broadcast_format, partial_layer_artifact, realign

        loaded = self._load()
        seed = stable_seed(self.config.seed, "realign", round)
        batches = seeded_batches(loaded.public_ids, self.config.align.batch_size, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            result = realign(
                loaded.teacher,
                loaded.student,
                global_adapter,
                self.kept,
                self.removed_groups,
                batches,
                config=self.config.align,
                lora=self.config.lora,
                steps=self.config.steps,
                heldout_ids=loaded.heldout_ids,
                quant=self.config.quantize,
            )
        self.partial_state = result.partial_layer_state
        entry = {"round": round, **{k: result.metrics[k] for k in ("steps", "partial_layers", "measured", "warnings")}}
        self.history.append(entry)
        self._log(entry)
        # No metadata: safetensors writes it in hash order, and the same layers must be the same bytes.
        return save(partial_layer_artifact(self.partial_state, broadcast_format(self.config.align, self.config.quantize)))

    def drift(self, round: int, global_adapter: AdapterState) -> float:
        """The deployed client model's KL to the full LLM, both with the global adapter, on the
        first federate.drift_sequences public (training-split) windows: a fixed batch, so the
        numbers of different rounds compare."""
        import torch

        from fedsoda_cli.oda.realign import adapter_drift

        loaded = self._load()
        ids = loaded.public_ids[: self.config.drift_sequences]
        with torch.random.fork_rng(devices=[]):  # attaching LoRA draws an init: leave the run's RNG as it was
            measured = adapter_drift(
                loaded.teacher,
                loaded.student,
                global_adapter,
                self.kept,
                self.removed_groups,
                ids,
                config=self.config.align,
                lora=self.config.lora,
                quant=self.config.quantize,
            )
        return float(measured["kl"])

    def _log(self, entry: dict[str, Any]) -> None:
        import json
        import logging

        if entry["warnings"]:
            logging.getLogger("fedsoda.realign").warning(
                "realignment in round %d made numbers worse: %s", entry["round"], "; ".join(entry["warnings"])
            )
        if self.log_path is not None:
            with self.log_path.open("a") as lines:
                lines.write(json.dumps(entry, sort_keys=True) + "\n")

    def state_dict(self) -> dict[str, Any]:
        """The master copy's partial layers after the last realignment (float32 tensors)."""
        return dict(self.partial_state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put the checkpointed partial layers back into the master copy."""
        result = self._load().student.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ArtifactError(
                f"checkpoint realign state has tensors the sub-LLM lacks (e.g. {result.unexpected_keys[0]}); rerun without --resume"
            )
        self.partial_state = dict(state)

    def _load(self) -> _Loaded:
        if self.loaded is not None:
            return self.loaded
        import torch

        from fedsoda_cli.data.public import public_windows_in
        from fedsoda_cli.models.load import load_causal_lm, load_checkpoint

        teacher, tokenizer = load_causal_lm(self.config.model)
        student, _ = load_checkpoint(self.align_model_dir, dtype=torch.float32)
        self.loaded = _Loaded(
            teacher,
            student,
            public_windows_in(self.config.public_data, self.config.data_dir, "train", tokenizer, self.config.template),
            public_windows_in(self.config.public_data, self.config.data_dir, "held-out", tokenizer),
        )
        return self.loaded
