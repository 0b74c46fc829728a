"""Streaming angular distances between residual-stream boundaries, and ShortGPT block influence.

Boundary l (0..L) is the residual-stream input of decoder layer l; boundary L is the output of the
last layer, before the final norm. For a span n and a start l,

    d_n(l) = mean of arccos(cos(h_l, h_{l+n})) / pi

over the measured tokens: the last non-pad token of each sequence (`tokens = "last"`), or every
non-pad token of every sequence pooled together (`tokens = "all"`, a token-weighted mean).
Block influence is `BI_l = 1 - mean cos(h_l, h_{l+1})` over every non-pad token, whatever `tokens`.

Memory: boundaries arrive one at a time during the forward pass (through `residual_stream`); only
the last `max_span` of them are kept, as float64 copies of the measured tokens, and the
batch's contribution is folded into running sums. Nothing grows with the number of sequences or
the depth.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Literal

import torch

from fedsoda_cli.plugins.contracts import LayerProfile

Tokens = Literal["last", "all"]


class AngularDistanceAccumulator:
    """Running sums of d_n(l) for n = 1..max_span and of BI_l, fed batch by batch.

    Per batch: `begin_batch(attention_mask)`, then `add_boundary(l, h)` for l = 0..L in order, with
    `h` of shape [batch, seq, hidden]. `result()` gives the means so far as a LayerProfile.
    """

    def __init__(self, num_layers: int, max_span: int, tokens: Tokens):
        if tokens not in ("last", "all"):
            raise ValueError(f"tokens must be 'last' or 'all', got {tokens!r}")
        self.num_layers = num_layers
        self.max_span = max(1, min(max_span, num_layers))
        self.tokens = tokens
        # angle_sums[n-1, l] accumulates arccos(cos)/pi of span n starting at l; entries with
        # l > L-n stay zero and are never read.
        self.angle_sums = torch.zeros(self.max_span, num_layers, dtype=torch.float64)
        self.angle_counts = torch.zeros(self.max_span, num_layers, dtype=torch.float64)
        self.cos_sums = torch.zeros(num_layers, dtype=torch.float64)
        self.cos_counts = torch.zeros(num_layers, dtype=torch.float64)
        self._started = False
        self._mask: torch.Tensor | None = None
        self._next = 0
        self._recent: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=self.max_span)
        self._previous_all: tuple[torch.Tensor, torch.Tensor] | None = None
        self._buffers: list[torch.Tensor] = []

    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        """Start a batch; `attention_mask` [batch, seq] marks real tokens with 1 (any padding side)."""
        mask = attention_mask.bool()
        # Where the measured tokens are, worked out once per batch rather than per boundary.
        self._mask = None if bool(mask.all()) else mask  # None: nothing padded, take every row
        positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
        self._rows = mask.any(dim=1)  # sequences without a real token are left out
        self._last = (mask * positions).argmax(dim=1)[self._rows]  # last real position, any padding side
        self._started = True
        self._next = 0
        self._recent.clear()
        self._previous_all = None

    def add_boundary(self, index: int, hidden: torch.Tensor) -> None:
        """Fold boundary `index` of the current batch into the sums (boundaries come in order)."""
        if not self._started or index != self._next:
            raise RuntimeError(
                f"boundary {index} arrived out of order (expected {self._next}); call begin_batch first and feed 0..L once"
            )
        self._next += 1
        hidden = hidden.detach()
        every = self._copy_of_real_tokens(index, hidden)
        measured = every if self.tokens == "all" else _vectors(hidden[self._rows, self._last].to(torch.float64))
        for span, earlier in enumerate(reversed(self._recent), start=1):
            angles = torch.arccos(_cosine(earlier, measured)) / torch.pi
            self.angle_sums[span - 1, index - span] += angles.sum().cpu()
            self.angle_counts[span - 1, index - span] += angles.numel()
        if index > 0:
            # BI always uses every non-pad token; in "all" mode the previous boundary's vectors
            # are the ones already kept for span 1, so only "last" mode keeps a second copy.
            previous = self._recent[-1] if self.tokens == "all" else self._previous_all
            assert previous is not None  # boundary index - 1 of this batch set it (boundaries come in order)
            cos = _cosine(previous, every)
            self.cos_sums[index - 1] += cos.sum().cpu()
            self.cos_counts[index - 1] += cos.numel()
        self._recent.append(measured)
        self._previous_all = every if self.tokens == "last" else None
        if index == self.num_layers:
            self._started = False  # the batch is complete; free its tensors
            self._recent.clear()
            self._previous_all = None

    def _copy_of_real_tokens(self, index: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every real token of boundary `index` in float64 with its lengths, written into a ring of
        preallocated buffers: one per boundary still needed (max_span + 1 with "all", 2 with
        "last"). Reusing them keeps the allocator from growing the heap boundary after boundary."""
        rows = hidden.flatten(0, 1) if self._mask is None else hidden[self._mask]
        slots = self.max_span + 1 if self.tokens == "all" else 2
        if self._buffers and self._buffers[0].shape != rows.shape:
            self._buffers = []  # a batch of another size
        if len(self._buffers) < slots:
            self._buffers.append(torch.empty(rows.shape, dtype=torch.float64, device=rows.device))
        buffer = self._buffers[index % slots]
        buffer.copy_(rows)
        return buffer, torch.linalg.vector_norm(buffer, dim=-1)

    def result(self) -> LayerProfile:
        """Mean d_n(l) for every span n and start l = 0..L-n, and BI_l for l = 0..L-1."""
        if not bool((self.cos_counts > 0).all()):
            raise RuntimeError("no complete batch was measured")
        distances = {}
        for n in range(1, self.max_span + 1):
            starts = self.num_layers - n + 1
            means = self.angle_sums[n - 1, :starts] / self.angle_counts[n - 1, :starts]
            distances[n] = [float(v) for v in means]
        influence = 1.0 - self.cos_sums / self.cos_counts
        return LayerProfile(num_layers=self.num_layers, distances=distances, block_influence=[float(v) for v in influence])


def measure(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_span: int,
    tokens: Tokens,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> LayerProfile:
    """Angular distances and block influence of `model` (full or pruned) over `input_ids` [N, T].

    `attention_mask` [N, T] (None = no padding) marks real tokens; `max_span` is capped at the
    model's layer count. Runs the decoder stack only (no lm_head), without gradients, `batch_size`
    sequences at a time; `progress(k)` is called after each batch with the k sequences it held.
    Layer indices are positions in the model as it is now.
    """
    from fedsoda_cli.models.layers import decoder_layers, residual_stream

    num_layers = len(decoder_layers(model))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    accumulator = AngularDistanceAccumulator(num_layers, max_span, tokens)
    # The base model stops before lm_head: logits over the vocabulary would cost more time and
    # memory than everything measured here, and are not needed.
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    device = next(model.parameters()).device
    with torch.no_grad(), residual_stream(model, accumulator.add_boundary):
        for begin in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[begin : begin + batch_size].to(device)
            mask = attention_mask[begin : begin + batch_size].to(device)
            accumulator.begin_batch(mask)
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            if progress is not None:
                progress(ids.shape[0])
    return accumulator.result()


def _vectors(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and their lengths (kept apart: dividing the norms out of each dot product is cheaper
    than normalising every row)."""
    return rows, torch.linalg.vector_norm(rows, dim=-1)


def _cosine(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Row-wise cosine of two `_vectors` results, clamped to [-1, 1] (a zero row gives 0)."""
    dots = torch.linalg.vecdot(a[0], b[0])
    return (dots / (a[1] * b[1]).clamp_min(1e-300)).clamp_(-1.0, 1.0)
