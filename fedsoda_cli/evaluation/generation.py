"""Greedy generation of answers (GSM8K and free-text tasks) and their exact match.

Prompt ids are those of training: lead + prompt (fedsoda_cli.data.sft.encode_prompt), cut from
the left to `max_len` tokens. Batches are left-padded (generation continues at the right edge);
generate() derives each row's positions from the attention mask, so padding does not shift them.
A generation stops at eos, at `max_new_tokens`, or when the model starts a new "Question:" (a
model trained on "Question: ...\\nAnswer: ..." pairs often goes on to invent the next pair).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedsoda_cli.data.answers import extract_gsm8k_answer
from fedsoda_cli.data.sft import leading_special_ids

STOP = "Question:"

Advance = Callable[[int], None]


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    max_len: int,
    batch_size: int,
    stop: str = STOP,
    advance: Advance | None = None,
) -> list[str]:
    """The greedy continuation of every prompt, decoded, cut before `stop`. `advance(k)` after each batch."""
    from transformers import GenerationConfig

    lead = leading_special_ids(tokenizer)
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    keep = max(1, max_len - len(lead))
    rows = [lead + list(ids[-keep:]) for ids in encoded]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # A fresh config: the checkpoint's own may ask for sampling (temperature, top_p).
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        stop_strings=[stop],
    )
    device = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        input_ids, attention_mask = _left_pad(batch, pad_id)
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            tokenizer=tokenizer,
        )
        new_tokens = out[:, input_ids.shape[1] :].cpu()
        texts.extend(cut_at_stop(text, stop) for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        if advance:
            advance(len(batch))
    return texts


def cut_at_stop(text: str, stop: str = STOP) -> str:
    """`text` up to (not including) the first `stop`, trailing whitespace removed."""
    return text.split(stop, 1)[0].rstrip()


def numeric_match(prediction: str, gold: str) -> tuple[str | None, str | None, bool]:
    """GSM8K exact match: (predicted number, gold number, equal); no number predicted is wrong."""
    predicted, expected = extract_gsm8k_answer(prediction), extract_gsm8k_answer(gold)
    return predicted, expected, predicted is not None and predicted == expected


def text_match(prediction: str, gold: str) -> tuple[str, str, bool]:
    """Free-text exact match on the first line, surrounding whitespace ignored."""
    predicted = prediction.strip().split("\n", 1)[0].strip()
    expected = gold.strip().split("\n", 1)[0].strip()
    return predicted, expected, predicted == expected


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention_mask[i, width - len(ids) :] = 1
    return input_ids, attention_mask
