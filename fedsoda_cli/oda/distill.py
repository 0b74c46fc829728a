"""Orchestrated distillation alignment (ODA): the loss, the partial-layer training loop and the
before/after measurements, shared by the align stage (stage 3), realignment (`oda/realign.py`: the federated runtime every r
rounds, and the on-demand `fedsoda realign` stage) and the quantize stage's measurements.

Loss on a batch of public text (teacher = full LLM, frozen; student = sub-LLM):
    L = alpha * tau^2 * KL(p_T^tau || p_S^tau)           mean over all non-pad tokens
      + beta  * sum over gaps g of ||h_T(g) - h_S(g)||^2 / ||h_T(g)||^2
      + gamma * CE(student, next token)                  mean over predicted non-pad tokens
With `align.hidden_at = "output"` (default) the sum runs over the trained layers k: h_S is the
output of student layer k, h_T the output of original layer kept[k] (the same original depth), so
every trained layer has a hidden-state signal of its own. With "gap" (the older variant), g runs
over the gaps: h(g) is the input of the first kept layer after the gap (teacher: original layer
kept[k]); a gap at the very end compares the last layer's output before the final norm. That
comparison point lies before the layer after the gap, so with `partial = "after_gap"` the first
gap's term cannot train. With `align.hidden_norm = "token"` (default) each non-pad token's error is
normalised by its own norm and the ratios are averaged; "pooled" sums errors and norms over the
batch first, which lets the first token (the attention sink, ~99 % of the pooled norm in SmolLM2)
decide the term alone. Groups that touch each other share one gap and count once.

Measurements (`evaluate_alignment`) report the hidden NMSE per gap: at the output of the first kept
layer after it ("output") or at its input ("gap").

Quantization-aware alignment (`align.quant_aware`, `fedsoda_cli.models.fakequant`): with a
`quant` given, the student trains as the client will run it: frozen layers in that format,
partial layers float (and, for "ste", fake-quantized in the forward pass).

Memory: the vocabulary is large (49k for SmolLM2), so B*T*V logits for teacher and student plus
their gradients would dominate. Both trunks run only to their final (normed) hidden states, the
teacher without grad. The KL and CE are then computed over the non-pad tokens in chunks of
`align.logit_chunk` tokens: each chunk goes through the lm_heads inside `torch.utils.checkpoint`,
so its logits are freed after the forward and recomputed in the backward, and only one chunk of
logits is alive at a time. See docs/alignment.md.

Only the partial layers train (`align.partial`); every other weight, and any LoRA adapter attached
to the student, keeps requires_grad=False, so they stay bit-identical.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fedsoda_cli.errors import SpecError
from fedsoda_cli.models.layers import unwrap
from fedsoda_cli.spec.schema import AlignSpec, QuantizeSpec

IGNORE = -100


# ---- where to align -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Gap:
    """One alignment point: the removed layers before it and the residual-stream boundaries
    compared there (teacher: original layer index, or L for the final output; student: sub-LLM
    layer index, or len(kept) for the final output)."""

    removed: tuple[int, ...]
    teacher_boundary: int
    student_boundary: int

    @property
    def label(self) -> str:
        return f"{self.removed[0]}-{self.removed[-1]}" if len(self.removed) > 1 else str(self.removed[0])


@dataclass(frozen=True)
class Point:
    """A residual-stream comparison point that is not a gap's: the output of trained layer
    `kept[k]` (teacher boundary kept[k] + 1, student boundary k + 1)."""

    label: str
    teacher_boundary: int
    student_boundary: int


def gaps(kept: list[int], removed_groups: list[list[int]], num_layers: int) -> list[Gap]:
    """The alignment points of a pruned model, one per run of removed layers, in layer order."""
    by_boundary: dict[int, list[int]] = {}
    for group in sorted(removed_groups):
        after = [k for k, original in enumerate(kept) if original > max(group)]
        student = after[0] if after else len(kept)
        by_boundary.setdefault(student, []).extend(group)
    return [
        Gap(tuple(sorted(removed)), kept[k] if k < len(kept) else num_layers, k) for k, removed in sorted(by_boundary.items())
    ]


def partial_layers(partial: str | list[int], kept: list[int], removed_groups: list[list[int]]) -> list[int]:
    """Sub-LLM indices of the layers that train, for `align.partial`: after_gap (the kept layer
    right after each removed group; the last kept layer for a gap at the end), both_neighbours
    (also the kept layer right before), all_kept, or a list of ORIGINAL layer indices."""
    if isinstance(partial, list):
        missing = [layer for layer in partial if layer not in kept]
        if missing:
            raise SpecError(
                f"align.partial = {partial}: layers {missing} are not kept layers of the sub-LLM (kept: {kept}); list original indices of kept layers"
            )
        return sorted({kept.index(layer) for layer in partial})
    if partial == "all_kept":
        return list(range(len(kept)))
    if partial not in ("after_gap", "both_neighbours"):
        raise SpecError(
            f"align.partial = {partial!r}: use after_gap, both_neighbours, all_kept or a list of original layer indices"
        )
    chosen: set[int] = set()
    for group in removed_groups:
        after = [k for k, original in enumerate(kept) if original > max(group)]
        before = [k for k, original in enumerate(kept) if original < min(group)]
        chosen.add(after[0] if after else len(kept) - 1)
        if partial == "both_neighbours" and before:
            chosen.add(before[-1])
    return sorted(chosen)


def output_point(kept: list[int], k: int, num_layers: int) -> tuple[int, int]:
    """(teacher, student) boundaries of the output of student layer k: the input of the next layer,
    or the final output (before the norm) for the last one."""
    teacher = kept[k] + 1 if k + 1 < len(kept) else num_layers
    return teacher, k + 1


def loss_points(kept: list[int], removed_groups: list[list[int]], num_layers: int, partial: list[int], hidden_at: str) -> list:
    """The comparison points of the hidden-state term: the gaps ("gap"), or the output of every
    trained layer `partial` (sub-LLM indices) labelled "out<original index>" ("output")."""
    if hidden_at == "gap":
        return gaps(kept, removed_groups, num_layers)
    return [Point(f"out{kept[k]}", *output_point(kept, k, num_layers)) for k in sorted(partial)]


def gap_points(kept: list[int], removed_groups: list[list[int]], num_layers: int, hidden_at: str) -> list[Gap]:
    """One measuring point per gap, labelled by the gap: its input-of-the-next-layer point ("gap"),
    or the output of the first kept layer after it ("output"; a gap at the end: the final output)."""
    plan = gaps(kept, removed_groups, num_layers)
    if hidden_at == "gap":
        return plan
    return [
        Gap(g.removed, *output_point(kept, g.student_boundary, num_layers)) if g.student_boundary < len(kept) else g for g in plan
    ]


def check_trainable(config: AlignSpec, kept: list[int], removed_groups: list[list[int]], partial: list[int]) -> None:
    """SpecError when the configured loss has no term that depends on a trained layer (it would
    fail in backward with "element 0 of tensors does not require grad")."""
    if config.alpha > 0 or config.gamma > 0 or not partial:
        return
    if config.beta > 0 and config.hidden_at == "output":
        return
    reachable = config.beta > 0 and any(g.student_boundary > min(partial) for g in gaps(kept, removed_groups, max(kept) + 1))
    if not reachable:
        raise SpecError(
            f"align: alpha = gamma = 0 and beta = {config.beta} with hidden_at = {config.hidden_at!r}: no loss term "
            f'depends on the trained layers {[kept[k] for k in partial]}; set align.hidden_at = "output", '
            'or alpha > 0, or train a layer before a gap (align.partial = "both_neighbours")'
        )


# ---- the loss -------------------------------------------------------------------------------------


@dataclass
class LossParts:
    """The terms of one ODA loss evaluation (sums, so batches can be pooled)."""

    loss: torch.Tensor
    kl_sum: float
    tokens: int
    hidden_err: list[float]  # per point: sum ||h_T - h_S||^2 ("pooled"), or sum of per-token NMSEs ("token")
    hidden_norm: list[float]  # per point: sum ||h_T||^2 ("pooled"), or the token count ("token")
    ce_student_sum: float
    ce_teacher_sum: float
    predicted: int


def oda_loss(
    teacher, student, batch: dict[str, torch.Tensor], plan: list[Gap], config: AlignSpec, *, need_teacher_ce: bool = False
) -> LossParts:
    """The ODA loss of `student` against `teacher` on `batch` ({"input_ids", optional
    "attention_mask"}); differentiable w.r.t. the student's trainable weights when grad is on."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    with torch.no_grad():
        t_final, t_hidden = run_trunk(teacher, input_ids, mask, [g.teacher_boundary for g in plan])
    s_final, s_hidden = run_trunk(student, input_ids, mask, [g.student_boundary for g in plan])

    err, norm, hidden_term = [], [], s_final.new_zeros(())
    for g in plan:
        e, n = hidden_error(t_hidden[g.teacher_boundary][mask], s_hidden[g.student_boundary][mask], config.hidden_norm)
        err.append(float(e.detach()))
        norm.append(float(n))
        hidden_term = hidden_term + e / n.clamp_min(1e-12)

    labels = next_token_labels(input_ids, mask)
    kl_sum = ce_s = ce_t = s_final.new_zeros(())
    if config.alpha > 0 or config.gamma > 0 or need_teacher_ce:
        kl_sum, ce_s, ce_t = logit_terms(
            s_final[mask], t_final[mask], labels[mask], output_head(student), output_head(teacher), config.tau, config.logit_chunk
        )
    tokens, predicted = int(mask.sum()), int((labels != IGNORE).sum())
    loss = (
        config.alpha * config.tau**2 * kl_sum / max(tokens, 1)
        + config.beta * hidden_term
        + config.gamma * ce_s / max(predicted, 1)
    )
    return LossParts(loss, float(kl_sum.detach()), tokens, err, norm, float(ce_s.detach()), float(ce_t.detach()), predicted)


def hidden_error(ht: torch.Tensor, hs: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(numerator, denominator) of the hidden NMSE of teacher states `ht` and student states `hs`
    ([tokens, d]); sums, so batches pool by adding them. "pooled": sum ||h_T - h_S||^2 over
    sum ||h_T||^2, which the tokens with the largest norm dominate (SmolLM2's first token holds
    ~99 % of it); "token": the sum of each token's own ||h_T - h_S||^2 / ||h_T||^2 over the token
    count, so every token counts once."""
    if mode == "pooled":  # one sum over every element, in the order fedsoda always summed it
        return (ht - hs).pow(2).sum(), ht.pow(2).sum()
    squared_error, squared_norm = (ht - hs).pow(2).sum(-1), ht.pow(2).sum(-1)
    return (squared_error / squared_norm.clamp_min(1e-12)).sum(), squared_error.new_tensor(float(ht.shape[0]))


def run_trunk(
    model, input_ids: torch.Tensor, mask: torch.Tensor, boundaries: list[int]
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Final (normed) hidden states [B, T, H] of `model`'s decoder, and the residual stream at each
    boundary in `boundaries` (layer inputs; len(layers) = last layer's output before the norm)."""
    from fedsoda_cli.models.layers import residual_stream

    base = unwrap(model)
    wanted, captured = set(boundaries), {}

    def keep(index: int, hidden: torch.Tensor) -> None:
        if index in wanted:
            captured[index] = hidden

    with residual_stream(base, keep):
        final = base.get_decoder()(input_ids=input_ids, attention_mask=mask.long(), use_cache=False).last_hidden_state
    return final, captured


def next_token_labels(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """labels[b, t] = input_ids[b, t+1] where both positions are real tokens, else IGNORE."""
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = torch.where(mask[:, 1:] & mask[:, :-1], input_ids[:, 1:], IGNORE)
    return labels


def logit_terms(
    s_hidden: torch.Tensor, t_hidden: torch.Tensor, labels: torch.Tensor, s_head, t_head, tau: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of tau-scaled KL(p_T || p_S), student CE sum, teacher CE sum) over N tokens
    (`*_hidden` [N, H], `labels` [N]), computed `chunk` tokens at a time; with grad on, each
    chunk is checkpointed so only one chunk of logits is alive."""
    total = s_hidden.new_zeros(3)
    for start in range(0, s_hidden.shape[0], chunk):
        args = (s_hidden[start : start + chunk], t_hidden[start : start + chunk], labels[start : start + chunk])
        if torch.is_grad_enabled() and s_hidden.requires_grad:
            part = checkpoint(_chunk_terms, *args, s_head, t_head, tau, use_reentrant=False)
        else:
            part = _chunk_terms(*args, s_head, t_head, tau)
        total = total + part
    return total[0], total[1], total[2]


def _chunk_terms(s_hidden, t_hidden, labels, s_head, t_head, tau: float) -> torch.Tensor:
    """[KL sum, student CE sum, teacher CE sum] of one chunk of tokens."""
    s_logits = s_head(s_hidden).float()
    s_logp = F.log_softmax(s_logits / tau, dim=-1)
    with torch.no_grad():
        t_logits = t_head(t_hidden).float()
        t_logp = F.log_softmax(t_logits / tau, dim=-1)
        ce_t = F.nll_loss(t_logp if tau == 1 else F.log_softmax(t_logits, dim=-1), labels, ignore_index=IGNORE, reduction="sum")
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum")
    ce_s = F.nll_loss(s_logp if tau == 1 else F.log_softmax(s_logits, dim=-1), labels, ignore_index=IGNORE, reduction="sum")
    return torch.stack([kl, ce_s, ce_t])


def output_head(model):
    return unwrap(model).get_output_embeddings()


# ---- training --------------------------------------------------------------------------------


def seeded_batches(sequences: torch.Tensor, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches {"input_ids", "attention_mask"} of `sequences` [N, T], reshuffled each epoch
    by a generator seeded with `seed` (same seed, same order)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(sequences.shape[0], generator=generator)
        for start in range(0, len(order), batch_size):
            ids = sequences[order[start : start + batch_size]]
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def align_partial_layers(
    teacher,
    student,
    kept: list[int],
    removed_groups: list[list[int]],
    partial: str | list[int],
    batches: Iterable[dict[str, torch.Tensor]],
    config: AlignSpec,
    steps: int,
    *,
    quant: QuantizeSpec | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train the student's partial layers (only their base weights; LoRA modules stay frozen) for
    `steps` optimizer steps of the ODA loss on `batches`; the teacher stays frozen. The student is
    updated in place. With `quant` and `config.quant_aware` not "off", the student trains as the
    client model of `quant` (module doc); its frozen weights come back unchanged either way.
    Returns one metrics dict per step; `progress(metrics)` after each step."""
    from fedsoda_cli.models.layers import decoder_layers

    num_layers = len(decoder_layers(unwrap(teacher)))
    chosen = partial_layers(partial, kept, removed_groups)
    check_trainable(config, kept, removed_groups, chosen)
    plan = loss_points(kept, removed_groups, num_layers, chosen, config.hidden_at)
    trainable = partial_parameters(student, chosen)
    history: list[dict[str, Any]] = []
    if steps <= 0:
        return history
    optimizer = _optimizer(trainable, config)
    stream = iter(batches)
    with _only_training(teacher, student, trainable), training_view(student, quant, config, chosen):
        for step in range(1, steps + 1):
            started = time.perf_counter()
            parts = oda_loss(teacher, student, next(stream), plan, config)
            if not parts.loss.requires_grad:
                raise SpecError(
                    "align: the loss does not depend on the trained layers (all its weights are 0?); raise align.alpha, beta or gamma"
                )
            optimizer.zero_grad(set_to_none=True)
            parts.loss.backward()
            optimizer.step()
            row = {
                "step": step,
                "loss": float(parts.loss.detach()),
                **_readable(parts, plan),
                "seconds": round(time.perf_counter() - started, 3),
            }
            history.append(row)
            if progress:
                progress(row)
    return history


def training_view(student, quant: QuantizeSpec | None, config: AlignSpec, partial: list[int]):
    """The student as `config.quant_aware` trains it: the client model of `quant` around float
    partial layers (fake-quantized with a straight-through gradient for "ste"), or as it is."""
    from contextlib import nullcontext

    from fedsoda_cli.models.fakequant import deployed

    if quant is None or config.quant_aware == "off":
        return nullcontext()
    return deployed(student, quant, trainable=partial, ste=config.quant_aware == "ste")


def deployed_view(student, quant: QuantizeSpec, config: AlignSpec, partial: list[int]):
    """The student exactly as a client will hold it after `quantize` (partial layers in bf16 for
    `quant_aware = "bf16_partial"`), for measuring."""
    from fedsoda_cli.models.fakequant import deployed

    return deployed(student, quant, bf16=partial if config.quant_aware == "bf16_partial" else ())


def bf16_view(student):
    """The student with every weight rounded to bf16 (the float model as stored)."""
    from fedsoda_cli.models.fakequant import deployed

    return deployed(student, QuantizeSpec(quant_type="none"))


def partial_parameters(student, partial: list[int]) -> list[torch.nn.Parameter]:
    """The base weights of the student's partial layers (adapter weights excluded)."""
    from fedsoda_cli.models.layers import decoder_layers

    layers = decoder_layers(unwrap(student))
    return [p for k in partial for name, p in layers[k].named_parameters() if not _is_adapter(name)]


def _is_adapter(name: str) -> bool:
    return "lora_" in name


def _optimizer(params: list[torch.nn.Parameter], config: AlignSpec) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


@contextmanager
def _only_training(teacher, student, trainable: list[torch.nn.Parameter]):
    """Within: every teacher and student weight frozen except `trainable`, both in eval mode (no
    dropout). Afterwards the student's requires_grad flags and modes are restored."""
    flags = [(p, p.requires_grad) for p in list(student.parameters()) + list(teacher.parameters())]
    modes = [(m, m.training) for m in (teacher, student)]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        teacher.eval()
        student.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.train(mode)


def _readable(parts: LossParts, plan: list[Gap]) -> dict[str, Any]:
    nmse = [e / max(n, 1e-12) for e, n in zip(parts.hidden_err, parts.hidden_norm)]
    return {
        "kl": parts.kl_sum / max(parts.tokens, 1),
        "hidden_nmse": {g.label: v for g, v in zip(plan, nmse)},
        "ce": parts.ce_student_sum / max(parts.predicted, 1),
    }


# ---- measuring ---------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_alignment(
    teacher,
    student,
    kept: list[int],
    removed_groups: list[list[int]],
    heldout_ids: torch.Tensor,
    config: AlignSpec,
    *,
    batch_size: int | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """On held-out token windows [N, T] (no padding): {"kl": mean tau-scaled KL(p_T || p_S) per
    token, "hidden_nmse": {gap label: ||h_T - h_S||^2 / ||h_T||^2, per token or pooled as
    `config.hidden_norm` says (`hidden_error`)},
    "ppl_student", "ppl_teacher": exp of mean next-token NLL}."""
    from fedsoda_cli.models.layers import decoder_layers

    plan = gap_points(kept, removed_groups, len(decoder_layers(unwrap(teacher))), config.hidden_at)
    probe = config.model_copy(update={"alpha": 1.0, "gamma": 0.0})
    kl = tokens = predicted = 0.0
    ce_s = ce_t = 0.0
    err, norm = [0.0] * len(plan), [0.0] * len(plan)
    modes = [(m, m.training) for m in (teacher, student)]
    teacher.eval()
    student.eval()
    try:
        size = batch_size or config.batch_size
        for start in range(0, heldout_ids.shape[0], size):
            ids = heldout_ids[start : start + size]
            parts = oda_loss(teacher, student, {"input_ids": ids}, plan, probe, need_teacher_ce=True)
            kl += parts.kl_sum
            tokens += parts.tokens
            ce_s += parts.ce_student_sum
            ce_t += parts.ce_teacher_sum
            predicted += parts.predicted
            err = [a + b for a, b in zip(err, parts.hidden_err)]
            norm = [a + b for a, b in zip(norm, parts.hidden_norm)]
            if advance:
                advance(ids.shape[0])
    finally:
        for m, mode in modes:
            m.train(mode)
    return {
        "kl": kl / max(tokens, 1),
        "hidden_nmse": {g.label: e / max(n, 1e-12) for g, e, n in zip(plan, err, norm)},
        "ppl_student": math.exp(ce_s / max(predicted, 1)),
        "ppl_teacher": math.exp(ce_t / max(predicted, 1)),
        "tokens": int(tokens),
    }


def measure(
    teacher,
    student,
    kept: list[int],
    removed_groups: list[list[int]],
    heldout_ids: torch.Tensor,
    config: AlignSpec,
    quant: QuantizeSpec | None,
    partial: list[int],
    *,
    advance: Callable[[int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """`evaluate_alignment` of the student in bf16 ("bf16") and as a client of `quant` holds it
    ("deployed", emulated; see `deployed_view`), against the float teacher."""
    with bf16_view(student):
        bf16 = evaluate_alignment(teacher, student, kept, removed_groups, heldout_ids, config, advance=advance)
    with deployed_view(student, quant or QuantizeSpec(), config, partial):
        deployed = evaluate_alignment(teacher, student, kept, removed_groups, heldout_ids, config, advance=advance)
    return {"bf16": bf16, "deployed": deployed}


def regressions(pairs) -> list[str]:
    """One text per number that got worse from before to after, for (name, before, after)
    measurement dicts: KL, perplexity, hidden NMSE per gap."""
    found = []
    for name, b, a in pairs:
        if a["kl"] > b["kl"]:
            found.append(f"{name} KL {b['kl']:.4f} -> {a['kl']:.4f}")
        if a["ppl_student"] > b["ppl_student"]:
            found.append(f"{name} perplexity {b['ppl_student']:.2f} -> {a['ppl_student']:.2f}")
        for gap, value in b["hidden_nmse"].items():
            if a["hidden_nmse"].get(gap, value) > value:
                found.append(f"{name} hidden NMSE gap {gap} {value:.4f} -> {a['hidden_nmse'][gap]:.4f}")
    return found
