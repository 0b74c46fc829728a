"""Tokenizing examples for SFT: prompt + answer (+ eos), loss on the answer (and its eos) only.

Encoding rule, shared with the evaluator so that training and scoring see the same tokens:
the prompt and the answer are tokenized *separately* and their ids concatenated,
`ids = encode_prompt(prompt) + encode_answer(answer)`. `encode_prompt` adds the tokenizer's own
leading special tokens (e.g. Llama's BOS; none for SmolLM2), `encode_answer` adds none. Scoring a
label word after a prompt = log-likelihood of `encode_answer(word)` after `encode_prompt(prompt)`.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips


def leading_special_ids(tokenizer) -> list[int]:
    """The special ids the tokenizer puts in front of a text (BOS for Llama-style ones, often none)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def encode_prompt(tokenizer, prompt: str, lead: list[int] | None = None) -> list[int]:
    """Ids of a prompt: the tokenizer's leading special ids (pass `lead` to skip recomputing) + text."""
    lead = leading_special_ids(tokenizer) if lead is None else lead
    return list(lead) + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Ids of an answer (or a label word) as it follows the prompt: no special tokens."""
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"])


def fit_lengths(n_lead: int, n_prompt: int, n_answer: int, max_len: int) -> tuple[int, int]:
    """How many prompt tokens (kept from the right) and answer tokens (kept from the left) fit.

    The answer always survives when it can: the prompt is cut from the left first, down to a floor
    of min(n_prompt, max_len // 4) tokens so the model still sees some of its question; only when
    that is not enough is the answer cut at its end. `n_answer` includes the eos.
    """
    room = max_len - n_lead
    if n_prompt + n_answer <= room:
        return n_prompt, n_answer
    keep_prompt = max(room - n_answer, min(n_prompt, max_len // 4))
    return keep_prompt, room - keep_prompt


def sft_batch(examples, tokenizer, max_len: int, eos: bool = True) -> dict[str, torch.Tensor]:
    """A right-padded batch: `input_ids`, `attention_mask`, `labels` (LongTensors [B, T], T <= max_len).

    Sequence = lead + prompt + answer (+ eos when `eos`). `labels` equals `input_ids` on the answer
    (and eos) and is -100 on the lead, the prompt and the padding. Too long: see `fit_lengths`.
    """
    if not examples:
        raise ValueError("sft_batch needs at least one example")
    lead = leading_special_ids(tokenizer)
    if len(lead) + 2 > max_len:
        raise ValueError(f"max_len={max_len} is too small")
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    tail = [tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else []
    rows = []
    for prompt, answer in zip(prompts, answers):
        target = list(answer) + tail
        n_prompt, n_target = fit_lengths(len(lead), len(prompt), len(target), max_len)
        context = lead + list(prompt[len(prompt) - n_prompt :])
        rows.append((context, target[:n_target]))
    return _pad(rows, _pad_id(tokenizer))


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(c) + len(t) for c, t in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for i, (context, target) in enumerate(rows):
        n, m = len(context), len(target)
        input_ids[i, : n + m] = torch.tensor(context + target, dtype=torch.long)
        attention_mask[i, : n + m] = 1
        labels[i, n : n + m] = torch.tensor(target, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pad_id(tokenizer) -> int:
    """The pad id: the tokenizer's own, else eos (masked out anyway), else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
