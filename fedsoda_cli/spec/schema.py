"""The experiment spec: every key with its type, default, allowed range and a one-line description.

Each section is a pydantic model with `extra="forbid"`, so an unknown key is an error, and every
field carries a `description`, from which `docs/spec-reference.md` is generated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSpec(Section):
    name: str = Field("fedsoda-run", description="Name of the experiment, shown in summaries and reports.")
    workdir: str = Field(
        "runs/{name}",
        description="Where stage artifacts go; '{name}' expands to run.name. Relative paths are relative to the spec file's folder.",
    )
    seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,
        description="Seed for every random choice (data order, sampling, init); same seed, same numbers. numpy seeds take 32 bits.",
    )
    method: Literal["fedsoda", "fedpetuning", "fedot", "central", "local"] = Field(
        "fedsoda",
        description="fedsoda (prune+align+QLoRA), a baseline: fedpetuning (full model, LoRA on all layers), fedot (offsite-tuning emulator), or a reference bound on fedsoda's client model: central (all clients' data pooled, same steps and examples: the upper bound), local (each client trains alone: the lower bound).",
    )
    threads: int = Field(0, ge=0, description="Torch threads for the main process; 0 = all cores.")

    @model_validator(mode="after")
    def _name_is_one_folder(self):
        # run.workdir expands '{name}' into a path, so a name must not step out of (or away from) it.
        name, why = self.name, None
        if not name.strip():
            why = "is empty"
        elif len(name) > 100:
            why = f"is {len(name)} characters long (at most 100)"
        elif "/" in name or "\\" in name:
            why = "contains a path separator"
        elif ".." in name or name == ".":
            why = "contains '..' or is '.'"
        elif any(ord(c) < 32 or ord(c) == 127 for c in name):
            why = "contains a NUL or another control character"
        if why:
            raise ValueError(
                f"run.name {why}; a run name becomes a folder name in run.workdir: use letters, digits, '-', '_' or '.'"
            )
        return self


class ModelSpec(Section):
    name: str | None = Field(
        "smollm2-135m",
        description="Built-in model: smollm2-135m (embedded default), qwen2.5-coder-0.5b, tiny-random-llama, tiny-random-qwen2. Ignored when path or hub_id is set.",
    )
    path: str | None = Field(None, description="A local Hugging Face checkpoint folder of a decoder-only causal LM.")
    hub_id: str | None = Field(None, description="A Hugging Face hub id (needs network).")
    cache_dir: str | None = Field(
        None, description="Where converted built-in models are cached; default $FEDSODA_CACHE or ~/.cache/fedsoda."
    )

    @model_validator(mode="after")
    def _one_source(self):
        if self.name is None and self.path is None and self.hub_id is None:
            raise ValueError("set one of model.name, model.path or model.hub_id")
        return self


class DataSpec(Section):
    dir: str | None = Field(
        None,
        description="Folder with the datasets (sst2/, boolq/, gsm8k/, wikitext2/). Default: $FEDSODA_DATA, then ../shared/data beside the repository, then the Hugging Face hub.",
    )


PublicSource = Literal["wikitext2"]  # data.public.CORPORA says where each one lives


class PublicDataSpec(Section):
    source: PublicSource = Field(
        "wikitext2",
        description="Public proxy corpus for profile, align, realign and perplexity: wikitext2 (WikiText-2 raw, wikitext2/wiki.{valid,test}.raw under data.dir), the one corpus the data folder ships.",
    )
    split: Literal["valid", "test"] = Field(
        "valid", description="Split used for profiling and alignment (never the one perplexity is reported on)."
    )
    heldout_split: Literal["valid", "test"] = Field("test", description="Split for held-out perplexity and alignment checks.")
    sequences: int = Field(32, ge=1, description="Number of sequences (N) of public text for profile and align.")
    seq_len: int = Field(128, ge=8, le=8192, description="Tokens per public sequence (T).")
    heldout_sequences: int = Field(16, ge=1, description="Number of held-out sequences for perplexity / KL checks.")

    @model_validator(mode="after")
    def _disjoint(self):
        if self.split == self.heldout_split:
            raise ValueError(
                "public_data.split and public_data.heldout_split must differ (never evaluate on the distillation text)"
            )
        return self


class ProfileSpec(Section):
    max_span: int = Field(8, ge=1, description="Largest span n for which angular distances d_n(l) are computed.")
    tokens: Literal["last", "all"] = Field(
        "last", description="Tokens whose angular distance is averaged: the last non-pad token, or all non-pad tokens."
    )
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")


class PruneSpec(Section):
    strategy: str = Field(
        "sgp", description="Pruning strategy plugin: sgp, block-influence, uniform, last, or a registered third-party name."
    )
    group_size: int = Field(3, ge=1, description="n: consecutive layers per removed group.")
    groups: int = Field(3, ge=0, description="p: number of removed groups.")
    protect_first: bool = Field(True, description="Never remove layer 0.")
    protect_last: bool = Field(True, description="Never remove the last layer (L-1).")
    iterative: bool = Field(False, description="Re-profile the pruned model after each accepted group (sgp only).")
    min_kept_between: int = Field(
        0,
        ge=0,
        description="sgp: at least this many kept layers between two removed groups, so that each gap is followed by its own kept layer (the one align trains); 0 = groups may touch, and adjacent groups then remove one longer block. Not with prune.iterative or prune.storage_budget.",
    )
    rerank_top_k: int = Field(
        0,
        ge=0,
        description="sgp: choose each group among the top k non-overlapping blocks by angular distance by the measured perplexity of the pruned model on rerank_sequences public (profiling, not held-out) windows; 0 or 1 = by distance alone.",
    )
    rerank_sequences: int = Field(
        8, ge=1, description="Public windows the re-ranking perplexity is measured on (the first of public_data.sequences)."
    )
    storage_budget: float | None = Field(
        None,
        gt=0,
        description="Prune to a client-storage budget instead of a fixed n x p: the client model (quantize's model/ folder, as [quantize] says) must weigh at most this many bytes, or this fraction of the full model in bf16 when at most 1. The blocks (spans 1..profile.max_span, sizes may differ) are the exact minimum-total-distance choice that fits, by dynamic programming over the profile; prune.group_size and prune.groups are then unused. Predicted and actual bytes are recorded.",
    )


PartialLayers = Literal["after_gap", "both_neighbours", "all_kept"] | list[int]


class AlignSpec(Section):
    partial: PartialLayers = Field(
        "after_gap",
        description="Student layers that train: after_gap (kept layer right after each removed group), both_neighbours, all_kept, or a list of original layer indices. Default after_gap: on the SST-2 headline, both_neighbours and all_kept align the client model closer but the adapter transfers worse to the full LLM (plugin 80.1 and 68.7 % vs 80.9 %, 3 seeds; docs/alignment.md).",
    )
    alpha: float = Field(
        1.0, ge=0, description="Weight of the temperature-scaled KL(teacher || student) over all non-pad tokens."
    )
    beta: float = Field(1.0, ge=0, description="Weight of the normalised hidden-state error (see hidden_at).")
    hidden_at: Literal["output", "gap"] = Field(
        "output",
        description="Where the hidden-state term compares residual streams: output (the output of every trained layer against the teacher's at the same original depth) or gap (the input of the first kept layer after each gap; that layer cannot change its own input).",
    )
    hidden_norm: Literal["token", "pooled"] = Field(
        "token",
        description="How the hidden-state error is normalised, in the loss and in every hidden NMSE reported: token (each token's squared error over its own squared norm, averaged over tokens) or pooled (sums over all tokens, then one ratio). Default token: in SmolLM2 the first token's residual stream (the attention sink) holds ~99 % of the pooled squared norm, so a pooled NMSE measures and trains that one token (BENCHMARKS.md).",
    )
    quant_aware: Literal["ste", "frozen_rest", "bf16_partial", "off"] = Field(
        "off",
        description="Align the client model as deployed: the frozen layers in [quantize]'s format, and the partial layers fake-quantized with a straight-through gradient (ste), trained in float and re-quantized by quantize (frozen_rest), or trained in float and kept in bf16 on the client (bf16_partial, their bytes count in storage); off = align in float. Default off: on the SST-2 headline, 3 paired seeds, off gave the higher plugin accuracy (80.8 vs 79.0 %) at the same deployed KL; ste keeps the deployed perplexity closer to bf16 (BENCHMARKS.md).",
    )
    text: Literal["public", "task_prompts"] = Field(
        "public",
        description="What align and realign distil on: public (the [public_data] windows, as the method has it) or task_prompts (the same public text, sentence by sentence, poured into the task's prompt template with no answer, so the student also learns the teacher's answer distribution where a client's prompt ends; no task data is read). Before/after numbers stay on the plain held-out windows. Default public: on the SST-2 headline task_prompts lowered the first-round loss 10-12 % and helped under harsh label skew (+4-5 points, still collapsed) but cost 0.6-0.8 points IID (BENCHMARKS.md).",
    )
    gamma: float = Field(0.0, ge=0, description="Weight of the student's LM cross-entropy.")
    tau: float = Field(1.0, gt=0, description="Distillation temperature.")
    steps: int = Field(20, ge=0, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Sequences per step.")
    lr: float = Field(
        1e-4,
        gt=0,
        description="Learning rate. 1e-3 halves the deployed KL but moves the partial layers so far that the adapter no longer transfers to the full LLM (BENCHMARKS.md).",
    )
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    logit_chunk: int = Field(
        1024, ge=1, description="Tokens per chunk when computing KL over the vocabulary (bounds peak memory)."
    )


class QuantizeSpec(Section):
    quant_type: Literal["nf4", "fp4", "int8", "none"] = Field(
        "nf4", description="Format of the kept decoder layers' linear weights."
    )
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too (QLoRA double quantization).")
    embeddings: Literal["bf16", "int8"] = Field("bf16", description="Storage of embeddings and lm_head on the client.")


class LoraSpec(Section):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Names of the linear modules that get adapters.",
    )
    layers: list[int] | None = Field(
        None,
        description="Original layer indices that get adapters (default: every layer the client holds); fedot sets its bottom and top layers. Omit the key for every layer; an empty list is refused.",
    )

    @field_validator("layers")
    @classmethod
    def _layers_not_empty(cls, layers):
        # An empty list used to mean "every layer" downstream: the opposite of what it says.
        if layers is not None and not layers:
            raise ValueError("lora.layers is empty; omit the key to give every layer adapters, or list layer indices")
        if layers is not None and min(layers) < 0:
            raise ValueError(f"lora.layers holds {min(layers)}; layer indices start at 0")
        return layers


class TaskSpec(Section):
    name: Literal["sst2", "boolq", "gsm8k", "jsonl"] = Field(
        "sst2", description="Client task: sst2, boolq, gsm8k, or jsonl (your own files, see the field keys below)."
    )
    train_examples: int = Field(0, ge=0, description="Use at most this many training examples in all (0 = the whole split).")
    eval_examples: int = Field(0, ge=0, description="Evaluate on at most this many examples (0 = the whole split).")
    max_len: int = Field(256, ge=16, description="Token limit of a prompt plus answer in training.")
    prompt: str | None = Field(
        None,
        description="Prompt template with {fields} (no format spec, conversion or attribute); default: the task's built-in prompt.",
    )
    train_file: str | None = Field(None, description="jsonl task: training file (JSONL, CSV or Parquet).")
    eval_file: str | None = Field(None, description="jsonl task: evaluation file.")
    input_field: str = Field("input", description="jsonl task: field with the input text.")
    output_field: str = Field("output", description="jsonl task: field with the target text.")
    choices: list[str] | None = Field(
        None,
        description='jsonl task: label words (e.g. [" yes", " no"]); the output field must be one of them, and eval scores each word\'s log-likelihood (accuracy) instead of generating.',
    )
    val_examples: int = Field(
        200,
        ge=0,
        description="Validation examples for federate's per-round eval, drawn from the training split's examples that task.train_examples left unused (never trained on, never the reported eval split).",
    )
    train_eos: bool | None = Field(
        None,
        description="Train on the eos after the answer too (the model learns where to stop). Default: only for tasks whose eval generates (gsm8k, jsonl without choices); classification tasks are scored on the label word alone, so their loss is on the label word alone.",
    )
    boolq_eval_size: int = Field(
        1000,
        ge=1,
        description="BoolQ has no public train split here: this many dev examples form the derived eval split, the rest train.",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_fills_from_text(cls, prompt):
        # Filled against text-valued fields now, so that a bad format spec, conversion or attribute
        # fails at validate instead of after profile and prune have run.
        if prompt is not None:
            try:
                prompt.format_map(_AnyField())
            except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
                raise ValueError(
                    f"task.prompt {prompt!r} is not a usable template ({type(exc).__name__}: {str(exc).replace('_Text', 'str')}); "
                    "write fields as plain {name} and literal braces as {{ }}"
                ) from None
        return prompt


class _Text(str):
    """A record value that is text and can be indexed (a field may hold a list or object)."""

    def __getitem__(self, key):
        return self


class _AnyField(dict):
    def __missing__(self, key):
        return _Text("text")


RoundTarget = Literal["sub", "plugin"]


def _default_round_targets() -> list[RoundTarget]:
    return ["sub"]


class FederateSpec(Section):
    backend: Literal["local", "flower"] = Field(
        "local",
        description="How client tasks reach clients: local worker processes, or the SuperNodes of a Flower deployment (docs/flower.md).",
    )
    clients: int = Field(
        4, ge=1, le=10000, description="K: number of clients (each gets its own partition, so the count is bounded)."
    )
    clients_per_round: int = Field(2, ge=1, description="Clients sampled each round (seeded).")
    rounds: int = Field(2, ge=1, description="R: federated rounds.")
    workers: int = Field(2, ge=1, description="Worker processes; torch threads are split across them.")
    local_steps: int = Field(4, ge=1, description="Optimizer steps per client per round.")
    batch_size: int = Field(4, ge=1, description="Examples per local step.")
    lr: float = Field(2e-4, gt=0, description="Client learning rate.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Client optimizer.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping on the client.")
    proximal_mu: float = Field(0.01, ge=0, description="FedProx proximal term weight mu: (mu/2)||theta - theta_global||^2.")
    aggregator: str = Field(
        "fedavg",
        description="Aggregator plugin: fedavg, fedavgm (server momentum; options server_lr, momentum) or a registered third-party name (fedadam, fedyogi, trimmed_mean, median from plugins/).",
    )
    aggregator_options: dict[str, float | int | bool | str] = Field(
        default_factory=dict,
        description="Keyword arguments for the aggregator plugin's constructor, e.g. {trim = 0.2} for trimmed_mean or {server_lr = 0.001} for fedadam.",
    )
    realign_every: int = Field(5, ge=0, description="r: the server realigns every r rounds (0 = never).")
    min_clients: int = Field(
        1, ge=1, description="A round needs at least this many valid updates, else the run stops at the last good round."
    )
    max_update_norm: float = Field(
        1e3, gt=0, description="A client update whose L2 distance from the global adapter exceeds this is excluded."
    )
    partition: Literal["iid", "dirichlet", "shards"] = Field("iid", description="How task data is split over clients.")
    dirichlet_alpha: float = Field(0.5, gt=0, description="Label-skew concentration for partition = dirichlet.")
    shards_per_client: int = Field(2, ge=1, description="Label-sorted shards per client for partition = shards.")
    realign_when: Literal["every", "drift"] = Field(
        "every",
        description="When the server realigns: every realign_every rounds, or on drift: after each round it measures the deployed client model's KL to the full LLM, both with the global adapter, on drift_sequences fixed public windows (into metrics.jsonl), and of the every-realign_every-rounds candidates realigns only those where that KL exceeds drift_threshold x the same KL right after the last alignment (use realign_every = 1 to let drift decide every round).",
    )
    drift_threshold: float = Field(
        1.5,
        gt=1,
        description="realign_when = drift: realign when the drift exceeds this multiple of the drift right after the last (re)alignment.",
    )
    drift_sequences: int = Field(
        4,
        ge=1,
        description="realign_when = drift: public (training-split) windows of public_data.seq_len tokens the drift is measured on, the first of those align uses.",
    )
    realign_wire: Literal["delta", "full"] = Field(
        "delta",
        description="How realigned partial layers reach the clients: delta (only the 32-byte chunks of quantized codes and constants that changed against the version every client holds; applying it gives the same bytes as a re-download) or full (the whole layers). The Flower backend always sends the whole layers, and counts them.",
    )
    wire_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="How adapter tensors travel in both directions (bytes are counted as serialized); the server keeps an fp32 master, aggregates in fp32, and clients train in fp32 from the rounded global adapter.",
    )
    weighting: Literal["examples", "shard", "uniform"] = Field(
        "examples",
        description="Aggregation weight n_k of each client update: the examples it trained on this round (equal for clients that all finish local_steps, unlike shard sizes under skew), its shard size, or equal weights.",
    )
    eval_every: int = Field(
        0,
        ge=0,
        description="The server evaluates the global adapter on task.val_examples validation examples every k rounds and after the last (0 = only at the end, in eval); results go into metrics.jsonl.",
    )
    eval_targets: list[RoundTarget] = Field(
        default_factory=_default_round_targets,
        min_length=1,
        description="What per-round evaluation scores: sub (the client model the adapter trains on) and/or plugin (the full LLM with the mapped adapter).",
    )
    task_timeout_s: float = Field(
        1800.0, gt=0, description="Seconds a client task may take before its worker is considered dead."
    )
    flower_superlink: str = Field(
        "127.0.0.1:9093",
        description="backend = flower: host:port of the SuperLink (SuperNodes, `flwr run` and the ServerApp share it); fedsoda federate runs on the SuperLink's machine.",
    )
    flower_root_certificates: str | None = Field(
        None,
        description="backend = flower: the CA certificate (PEM, relative to the spec) of the SuperLink's TLS; required unless the SuperLink is on 127.0.0.1/localhost.",
    )
    flower_round_timeout_s: float = Field(
        600.0,
        gt=0,
        description="backend = flower: seconds to wait for a site's answer to a task; a site that does not answer in time fails its task (min_clients decides the round) and is not waited for again until it reconnects.",
    )
    flower_connect_timeout_s: float = Field(
        300.0,
        gt=0,
        description="backend = flower: seconds to wait for the ServerApp to start, for one SuperNode per client to connect, and for a site to prepare (load the client model, swap in realigned layers).",
    )

    @model_validator(mode="after")
    def _counts(self):
        if self.clients_per_round > self.clients:
            raise ValueError(
                f"federate.clients_per_round ({self.clients_per_round}) must be <= federate.clients ({self.clients})"
            )
        if self.min_clients > self.clients_per_round:
            raise ValueError(
                f"federate.min_clients ({self.min_clients}) must be <= federate.clients_per_round ({self.clients_per_round})"
            )
        return self


class RealignSpec(Section):
    steps: int = Field(
        10, ge=0, description="Distillation steps of each server realignment (the loss and optimizer come from [align])."
    )


class FedotSpec(Section):
    adapter_layers: int = Field(2, ge=1, description="k: bottom and top k layers of the full model form the trainable adapter.")
    drop_ratio: float = Field(0.3, gt=0, lt=1, description="Share of the middle layers the emulator drops (uniform stride).")


EvalTarget = Literal["plugin", "sub", "zero-shot"]


def _default_eval_targets() -> list[EvalTarget]:
    return ["plugin", "sub", "zero-shot"]


class EvalSpec(Section):
    targets: list[EvalTarget] = Field(
        default_factory=_default_eval_targets,
        min_length=1,
        description="What is evaluated: plugin (full LLM + mapped adapter), sub (quantized sub-LLM + adapter), zero-shot (full LLM alone); at least one.",
    )
    batch_size: int = Field(8, ge=1, description="Examples per forward pass.")
    perplexity: bool = Field(True, description="Also report perplexity on held-out public text.")
    max_new_tokens: int = Field(256, ge=1, description="Generation limit for GSM8K.")
    plugin_scale: float | Literal["val"] = Field(
        1.0,
        description=(
            "s: the plugin target (and `fedsoda export`) adds s x the global adapter's update to the full LLM "
            "(W + s (alpha / r) B A, s in (0, 4]; 1 = the adapter as trained, the method's plug-in). "
            "\"val\": chosen from plugin_scales by the plugin's accuracy on the task's validation slice "
            "(task.val_examples, disjoint from the eval split; ties go to the lower label-word loss, then the "
            "larger s), recorded in results.json. federate's per-round plugin evaluation always scores s = 1."
        ),
    )
    plugin_scales: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75, 1.0],
        min_length=1,
        description='The candidates of plugin_scale = "val".',
    )

    @field_validator("plugin_scale", mode="before")
    @classmethod
    def _positive_scale(cls, value):
        # before the union's own checks, so that any bad value gets this one message (and a TOML true,
        # which pydantic would take for 1.0, is refused)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value != "val" and not (number and 0 < value <= 4):
            raise ValueError(f'eval.plugin_scale must be a number in (0, 4] or "val", got {value!r}')
        return value

    @field_validator("plugin_scales")
    @classmethod
    def _positive_scales(cls, value):
        if any(not 0 < s <= 4 for s in value) or len(set(value)) != len(value):
            raise ValueError("eval.plugin_scales must be distinct numbers in (0, 4]")
        return value


SECTIONS: dict[str, type[Section]] = {
    "run": RunSpec,
    "model": ModelSpec,
    "data": DataSpec,
    "public_data": PublicDataSpec,
    "profile": ProfileSpec,
    "prune": PruneSpec,
    "align": AlignSpec,
    "quantize": QuantizeSpec,
    "lora": LoraSpec,
    "task": TaskSpec,
    "federate": FederateSpec,
    "realign": RealignSpec,
    "fedot": FedotSpec,
    "eval": EvalSpec,
}


class Spec(Section):
    """A whole experiment spec. `plugins` lists Python files whose registrations are loaded first."""

    _source: Path | None = PrivateAttr(None)

    plugins: list[str] = Field(
        default_factory=list, description="Python files (relative to the spec) that register third-party aggregators or pruners."
    )
    run: RunSpec = Field(default_factory=RunSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    public_data: PublicDataSpec = Field(default_factory=PublicDataSpec)
    profile: ProfileSpec = Field(default_factory=ProfileSpec)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    align: AlignSpec = Field(default_factory=AlignSpec)
    quantize: QuantizeSpec = Field(default_factory=QuantizeSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    task: TaskSpec = Field(default_factory=TaskSpec)
    federate: FederateSpec = Field(default_factory=FederateSpec)
    realign: RealignSpec = Field(default_factory=RealignSpec)
    fedot: FedotSpec = Field(default_factory=FedotSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @property
    def align_prompt(self) -> dict[str, str | None] | None:
        """What align and realign read of [task]: the keys the task's prompt template comes from when
        `align.text = "task_prompts"`, else None. A stage input (pipeline.ALIGN), so that a task
        change makes align stale only when align pours public text into the task's prompt."""
        if self.align.text != "task_prompts":
            return None
        return {"name": self.task.name, "prompt": self.task.prompt, "input_field": self.task.input_field}

    @model_validator(mode="after")
    def _validation_examples(self):
        # Caught here, before profile .. quantize have run, not when federate or eval finds no examples.
        readers = {
            "federate.eval_every > 0": bool(self.federate.eval_every),
            'eval.plugin_scale = "val"': self.eval.plugin_scale == "val" and "plugin" in self.eval.targets,
        }
        for key in (key for key, reads in readers.items() if reads):
            if not self.task.val_examples:
                raise ValueError(f"{key} needs task.val_examples > 0 (the validation slice it scores)")
            if not self.task.train_examples:
                raise ValueError(
                    f"{key} needs task.train_examples > 0: the validation slice comes from the "
                    "training examples it leaves unused (0 = all are used)"
                )
        return self

    @model_validator(mode="after")
    def _storage_budget(self):
        plain_sgp = self.prune.strategy == "sgp" and not self.prune.iterative and self.prune.storage_budget is None
        for key, used, what in (
            ("min_kept_between", self.prune.min_kept_between > 0, "spaces sgp's groups"),
            ("rerank_top_k", self.prune.rerank_top_k > 1, "re-ranks sgp's blocks by perplexity"),
        ):
            if used and not plain_sgp:
                raise ValueError(
                    f'prune.{key} {what}: it needs prune.strategy = "sgp", '
                    f"prune.iterative = false and no prune.storage_budget; set prune.{key} = 0 otherwise"
                )
        if self.prune.storage_budget is None:
            return self
        if self.prune.strategy != "sgp" or self.prune.iterative:
            raise ValueError(
                'prune.storage_budget chooses the blocks itself from the profile\'s distances: set prune.strategy = "sgp" '
                "and prune.iterative = false, or remove prune.storage_budget"
            )
        if self.align.quant_aware == "bf16_partial":
            raise ValueError(
                'prune.storage_budget cannot predict the bytes of align.quant_aware = "bf16_partial" (its bf16 partial '
                "layers depend on the gaps chosen); use another align.quant_aware or remove prune.storage_budget"
            )
        return self
