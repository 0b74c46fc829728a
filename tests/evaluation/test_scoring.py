"""Label-word scoring against a token-by-token hand computation, and its batching invariance."""

import torch

from fedsoda_cli.data.sft import sft_batch
from fedsoda_cli.evaluation.scoring import choice_contexts, label_word_logprobs
from fedsoda_cli.evaluation.task import evaluate_task


def _by_hand(model, context: list[int], word: list[int]) -> float:
    """sum over the word's tokens of log-softmax(logits of the whole prefix so far)[token], one forward per token."""
    total = 0.0
    prefix = list(context)
    with torch.no_grad():
        for token in word:
            logits = model(input_ids=torch.tensor([prefix])).logits[0, -1]
            total += torch.log_softmax(logits.double(), dim=-1)[token].item()
            prefix.append(token)
    return total


def test_label_word_score_equals_hand_computed_log_likelihood(tiny, sst2_like):
    model, tokenizer = tiny
    # multi-token "label words" too: each gets its own row, the single-token ones share one
    sst2_like[0].choices = [" negative", " absolutely wonderful", " positive", " truly awful film"]
    assert len(tokenizer(" truly awful film", add_special_tokens=False)["input_ids"]) > 2
    done = []
    scores = label_word_logprobs(model, tokenizer, sst2_like[:3], max_len=256, batch_size=2, advance=done.append)
    assert sum(done) == 3
    for example, row in zip(sst2_like[:3], scores):
        context = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        assert len(row) == len(example.choices)
        for choice, score in zip(example.choices, row):
            word = tokenizer(choice, add_special_tokens=False)["input_ids"]
            assert abs(score - _by_hand(model, context, word)) < 1e-4


def test_scoring_uses_the_same_tokens_as_training(tiny, sst2_like):
    """Context + gold word must be exactly the prefix of sft_batch's sequence, even when cut to max_len."""
    _, tokenizer = tiny
    for max_len in (256, 12):
        batch = sft_batch(sst2_like, tokenizer, max_len)
        for row, example, (context, words) in zip(
            range(len(sst2_like)), sst2_like, choice_contexts(tokenizer, sst2_like, max_len)
        ):
            gold = words[example.label]
            ids = batch["input_ids"][row][: len(context) + len(gold)].tolist()
            assert ids == context + gold
            # the first answer label of training sits right after the context
            assert batch["labels"][row][len(context)].item() == gold[0]


def test_padding_in_a_batch_does_not_change_scores(tiny, sst2_like):
    model, tokenizer = tiny
    alone = [label_word_logprobs(model, tokenizer, [e], max_len=256, batch_size=1)[0] for e in sst2_like]
    batched = label_word_logprobs(model, tokenizer, sst2_like, max_len=256, batch_size=4)
    for a, b in zip(alone, batched):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


def test_evaluate_task_predicts_argmax_and_counts_accuracy(tiny, sst2_like):
    model, tokenizer = tiny
    done = []
    score = evaluate_task(model, tokenizer, "sst2", sst2_like, batch_size=3, max_len=256, max_new_tokens=4, advance=done.append)
    assert sum(done) == len(sst2_like)
    assert score.count == 5 and score.metric == "label-word accuracy"
    for example, p in zip(sst2_like, score.predictions):
        best = max(range(2), key=p.scores.__getitem__)
        assert p.prediction == example.choices[best].strip()
        assert p.correct == (best == example.label)
    assert score.correct == sum(p.correct for p in score.predictions)
    lo, hi = score.ci95
    assert lo <= score.accuracy <= hi
