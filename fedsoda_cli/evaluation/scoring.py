"""Label-word scoring: the log-likelihood of each label word after the prompt, argmax = prediction.

Tokens are those of training (fedsoda_cli.data.sft): lead + prompt ids, then the label word's
ids, tokenized separately and concatenated. The prompt is cut from the left exactly as `sft_batch`
cuts it for an answer as long as the longest label word plus eos, so a model is scored on the same
context it was trained on. The score of a word is the SUM of its tokens' log-probabilities (eos
not included): sum, not mean, because it is the likelihood of the word itself.

One forward pass serves several words: a row is context + a tail, and scores every word that
only needs the tail as its teacher-forced prefix. All single-token words (" positive" /
" negative", " yes" / " no") are scored from the context's last position at once, so an example
costs one row, plus one row per multi-token word (context + that word minus its last token).

Batches are right-padded: with a causal mask, padding after a sequence cannot change its logits,
so a score does not depend on the batch it was computed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch

from fedsoda_cli.data.sft import encode_answer, fit_lengths, leading_special_ids

Advance = Callable[[int], None]  # called with the number of items just finished (progress bars)


@dataclass
class _Row:
    """One sequence to run: `context + tail`; `words` = (choice index, tokens) scored from it."""

    example: int
    context: list[int]
    tail: list[int]
    words: list[tuple[int, list[int]]] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return self.context + self.tail


def label_word_logprobs(
    model, tokenizer, examples: Sequence, *, max_len: int, batch_size: int, advance: Advance | None = None
) -> list[list[float]]:
    """For every example, the log-likelihood of each of its `choices` after its prompt.

    In: a causal LM (plain, PeftModel or quantized), its tokenizer, examples with `choices`,
    `max_len` = task.max_len of training. Out: one list of floats per example, in choice order.
    `batch_size` sequences per forward pass; `advance(k)` after each batch, k = examples finished.
    """
    rows = []
    for index, (context, words) in enumerate(choice_contexts(tokenizer, examples, max_len)):
        rows.extend(_rows(index, context, words))
    # Longest context first, so a batch holds similar lengths (less padding); the sort is stable and
    # an example's rows share their context, so they stay adjacent (progress counts on that).
    rows.sort(key=lambda r: -len(r.context))
    scores: list[list[float | None]] = [[None] * len(e.choices) for e in examples]
    tick = _examples_done(advance, [r.example for r in rows])
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        for row, row_scores in zip(batch, _score_batch(model, batch, _pad_id(tokenizer))):
            for (choice, _), score in zip(row.words, row_scores):
                scores[row.example][choice] = score
        if tick:
            tick(len(batch))
    return cast(list[list[float]], scores)  # no None is left: every choice belongs to exactly one row


def choice_contexts(tokenizer, examples: Sequence, max_len: int) -> list[tuple[list[int], list[list[int]]]]:
    """(context ids, [ids of each choice]) per example; context = lead + the prompt cut as in training."""
    lead = leading_special_ids(tokenizer)
    eos = 1 if tokenizer.eos_token_id is not None else 0
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    result = []
    for example, prompt in zip(examples, prompts):
        if not example.choices:
            raise ValueError(f"example {example.id} has no label words (choices); score it by generation")
        words = [encode_answer(tokenizer, choice) for choice in example.choices]
        if not all(words) or not prompt and not lead:
            raise ValueError(f"example {example.id}: an empty prompt or label word cannot be scored")
        n_prompt, _ = fit_lengths(len(lead), len(prompt), max(map(len, words)) + eos, max_len)
        result.append((lead + list(prompt[len(prompt) - n_prompt :]), words))
    return result


def _rows(example: int, context: list[int], words: list[list[int]]) -> list[_Row]:
    """One row per multi-token word (tail = the word minus its last token); the single-token words
    ride on the first row, or on a row of the bare context when every word is one token."""
    rows = [_Row(example, context, word[:-1], [(i, word)]) for i, word in enumerate(words) if len(word) > 1]
    singles = [(i, word) for i, word in enumerate(words) if len(word) == 1]
    if singles:
        if not rows:
            rows.append(_Row(example, context, []))
        rows[0].words.extend(singles)
    return rows


@torch.no_grad()
def _score_batch(model, rows: Sequence[_Row], pad_id: int) -> list[list[float]]:
    """Per row, the summed log-probability of each of its words."""
    device = next(model.parameters()).device
    width = max(len(r.ids) for r in rows)
    span = max(len(r.tail) + 1 for r in rows)  # positions from the context's last token onwards
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    positions = torch.zeros((len(rows), span), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row.ids)] = torch.tensor(row.ids)
        attention_mask[i, : len(row.ids)] = 1
        first = len(row.context) - 1
        # padded positions repeat the last real one; nothing reads them
        positions[i] = torch.arange(first, first + span).clamp(max=len(row.ids) - 1)
    # Projecting only the needed positions onto the vocabulary saves most of the lm_head's work.
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        use_cache=False,
        logits_to_keep=positions.to(device),
    )
    logits = out.logits.float().cpu()
    if logits.shape[1] != span:  # an architecture that ignores logits_to_keep: pick the positions here
        logits = torch.take_along_dim(logits, positions[..., None], dim=1)
    logprobs = torch.log_softmax(logits, dim=-1)
    return [
        [sum(logprobs[i, j, token].item() for j, token in enumerate(word)) for _, word in row.words] for i, row in enumerate(rows)
    ]


def _examples_done(advance: Advance | None, owners: list[int]) -> Advance | None:
    """Translate "k more rows scored" into "k' more examples complete" (an example's rows are adjacent)."""
    if advance is None:
        return None
    # ends[e] = index of the last row of the e-th example in row order
    ends = [i for i in range(len(owners)) if i + 1 == len(owners) or owners[i + 1] != owners[i]]
    state = {"rows": 0, "examples": 0}

    def tick(k: int) -> None:
        state["rows"] += k
        done = state["examples"]
        while done < len(ends) and ends[done] < state["rows"]:
            done += 1
        if done > state["examples"]:
            advance(done - state["examples"])
            state["examples"] = done

    return tick


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
