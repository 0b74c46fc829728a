import torch

from fedsoda_cli.data.sft import IGNORE_INDEX, encode_answer, encode_prompt, fit_lengths, sft_batch
from fedsoda_cli.data.tasks import Example


def ex(prompt, answer, label=None, choices=None):
    return Example(id="x", prompt=prompt, answer=answer, label=label, choices=choices)


def test_labels_mask_exactly_prompt_and_padding(tokenizer):
    examples = [ex("Review: great film\nSentiment:", " positive", 1), ex("Question: 2+2?\nAnswer:", " 2 + 2 = 4\n#### 4")]
    batch = sft_batch(examples, tokenizer, max_len=64)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for i, e in enumerate(examples):
        prompt = encode_prompt(tokenizer, e.prompt)
        target = encode_answer(tokenizer, e.answer) + [tokenizer.eos_token_id]
        n, m = len(prompt), len(target)
        row = batch["input_ids"][i]
        assert row[: n + m].tolist() == prompt + target
        assert batch["labels"][i, :n].eq(IGNORE_INDEX).all()
        assert batch["labels"][i, n : n + m].tolist() == target
        assert batch["labels"][i, n + m :].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * (n + m) + [0] * (row.numel() - n - m)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == batch["labels"].shape


def test_separate_tokenization_is_what_the_model_sees(tokenizer):
    # label words start with a space and tokenize to a single token after the prompt
    assert len(encode_answer(tokenizer, " positive")) == 1
    assert len(encode_answer(tokenizer, " negative")) == 1
    assert len(encode_answer(tokenizer, " yes")) == 1 and len(encode_answer(tokenizer, " no")) == 1


def test_long_prompt_is_cut_from_the_left_and_answer_survives(tokenizer):
    long_prompt = "word " * 300 + "\nSentiment:"
    batch = sft_batch([ex(long_prompt, " positive", 1)], tokenizer, max_len=32)
    assert batch["input_ids"].shape == (1, 32)
    target = encode_answer(tokenizer, " positive") + [tokenizer.eos_token_id]
    assert batch["labels"][0, -len(target) :].tolist() == target
    # the kept prompt is the end of the prompt
    tail = encode_prompt(tokenizer, long_prompt)[-(32 - len(target)) :]
    assert batch["input_ids"][0, : 32 - len(target)].tolist() == tail


def test_fit_lengths_keeps_some_prompt_when_answer_is_huge():
    assert fit_lengths(0, 10, 5, 64) == (10, 5)  # fits
    assert fit_lengths(1, 100, 20, 64) == (43, 20)  # prompt cut, answer whole
    assert fit_lengths(0, 100, 200, 64) == (16, 48)  # answer too long: prompt floor max_len // 4
    assert fit_lengths(0, 3, 200, 64) == (3, 61)


def _bos_tokenizer():
    """A tiny word-level tokenizer that, like Llama's, puts a BOS in front of every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "a": 3, "b": 4, "Review:": 5, "positive": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_bos_goes_before_the_prompt_only_and_is_masked():
    tok = _bos_tokenizer()
    assert encode_prompt(tok, "Review: a") == [0, 5, 3]
    assert encode_answer(tok, "positive") == [6]
    batch = sft_batch([ex("Review: a", "positive", 1), ex("b", "a b")], tok, max_len=16)
    assert batch["input_ids"].tolist() == [[0, 5, 3, 6, 1], [0, 4, 3, 4, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 6, 1], [-100, -100, 3, 4, 1]]


def test_bos_survives_left_truncation():
    tok = _bos_tokenizer()
    batch = sft_batch([ex("a " * 20, "positive", 1)], tok, max_len=8)
    assert batch["input_ids"][0].tolist() == [0] + [3] * 5 + [6, 1]


def test_without_eos_the_loss_is_on_the_answer_alone(tokenizer):
    e = ex("Review: great film\nSentiment:", " positive", 1, [" negative", " positive"])
    batch = sft_batch([e], tokenizer, max_len=64, eos=False)
    prompt, answer = encode_prompt(tokenizer, e.prompt), encode_answer(tokenizer, e.answer)
    assert batch["input_ids"][0].tolist() == prompt + answer
    assert batch["labels"][0].ne(IGNORE_INDEX).sum().item() == len(answer)
    assert tokenizer.eos_token_id not in batch["labels"][0].tolist()


def test_scored_tasks_train_without_eos_and_generating_tasks_with_it():
    from fedsoda_cli.data.tasks import trains_eos
    from fedsoda_cli.spec.schema import TaskSpec

    assert not trains_eos(TaskSpec(name="sst2")) and not trains_eos(TaskSpec(name="boolq"))
    assert trains_eos(TaskSpec(name="gsm8k")) and trains_eos(TaskSpec(name="jsonl"))
    assert not trains_eos(TaskSpec(name="jsonl", choices=[" a", " b"]))
    assert trains_eos(TaskSpec(name="sst2", train_eos=True)) and not trains_eos(TaskSpec(name="gsm8k", train_eos=False))
