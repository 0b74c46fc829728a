import pytest
import torch

from fedsoda_cli.data.public import hub_rows_to_lines, public_sequences, wikitext_articles
from fedsoda_cli.errors import DataError

RAW = [
    "",
    " = Alpha = ",
    " ",
    " First paragraph . ",
    " Second line , same paragraph block . ",
    " ",
    " = = Section = = ",
    " ",
    " Section text @-@ kept . ",
    " ",
    " = Beta = ",
    " ",
    " Beta text . ",
    "",
]


def test_articles_keep_structure_and_drop_blank_lines():
    articles = wikitext_articles(RAW)
    assert articles == [
        "= Alpha =\nFirst paragraph .\nSecond line , same paragraph block .\n= = Section = =\nSection text @-@ kept .\n\n",
        "= Beta =\nBeta text .\n\n",
    ]


def test_hub_rows_map_to_the_same_lines_as_the_file():
    # The hub stores one row per file line, newline included; blank lines are empty strings.
    rows = [{"text": line + "\n" if line.strip() else ""} for line in RAW]
    assert wikitext_articles(hub_rows_to_lines(rows)) == wikitext_articles(RAW)


def test_shape_dtype_and_determinism(data_dir, tokenizer):
    a = public_sequences(data_dir, "valid", tokenizer, n=4, seq_len=32)
    b = public_sequences(data_dir, "valid", tokenizer, n=4, seq_len=32)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b)


def test_prefix_stable_and_non_overlapping(data_dir, tokenizer):
    small = public_sequences(data_dir, "valid", tokenizer, n=2, seq_len=16)
    large = public_sequences(data_dir, "valid", tokenizer, n=6, seq_len=16)
    assert torch.equal(small, large[:2])
    # consecutive windows: window 1 continues window 0 in the token stream
    flat = public_sequences(data_dir, "valid", tokenizer, n=1, seq_len=32)[0]
    assert torch.equal(flat, large[:2].reshape(-1))


def test_text_starts_with_the_first_article(data_dir, tokenizer):
    first = public_sequences(data_dir, "valid", tokenizer, n=1, seq_len=16)[0]
    assert tokenizer.decode(first.tolist()).startswith("= Homarus gammarus =\nHomarus gammarus")


def test_valid_and_test_differ(data_dir, tokenizer):
    valid = public_sequences(data_dir, "valid", tokenizer, n=2, seq_len=32)
    test = public_sequences(data_dir, "test", tokenizer, n=2, seq_len=32)
    assert not torch.equal(valid, test)


def test_too_many_windows_says_how_many(data_dir, tokenizer):
    with pytest.raises(DataError, match=r"has only \d+ windows of 8192 tokens, 1000 were asked for"):
        public_sequences(data_dir, "valid", tokenizer, n=1000, seq_len=8192)


def test_missing_file(tmp_path, tokenizer):
    with pytest.raises(DataError, match="wiki.test.raw"):
        public_sequences(tmp_path, "test", tokenizer, n=1, seq_len=8)


def _with_bos(tokenizer):
    """The same tokenizer, but putting a BOS (<|endoftext|>) in front of every text, as Llama-3,
    Gemma and Mistral tokenizers do."""
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    bos = tokenizer.convert_ids_to_tokens(0)
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=bos)


def test_every_window_starts_with_the_leading_special_ids(data_dir, tokenizer):
    from fedsoda_cli.data.sft import leading_special_ids

    bos_tokenizer = _with_bos(tokenizer)
    assert leading_special_ids(bos_tokenizer) == [0] and leading_special_ids(tokenizer) == []
    windows = public_sequences(data_dir, "valid", bos_tokenizer, n=3, seq_len=16)
    plain = public_sequences(data_dir, "valid", tokenizer, n=3, seq_len=15)
    assert windows.shape == (3, 16)
    assert windows[:, 0].tolist() == [0, 0, 0]
    assert torch.equal(windows[:, 1:], plain)  # the text continues window to window as before
    assert torch.equal(public_sequences(data_dir, "valid", bos_tokenizer, n=1, seq_len=16), windows[:1])


def test_no_room_for_text_after_the_lead_is_an_error(data_dir, tokenizer):
    with pytest.raises(DataError, match="seq_len = 1 leaves no room"):
        public_sequences(data_dir, "valid", _with_bos(tokenizer), n=1, seq_len=1)


def test_the_corpus_is_the_one_public_data_source_names(data_dir, tokenizer):
    # The windows come from the files of the corpus the spec names; an unknown name is refused,
    # naming the key, before any file is read.
    from fedsoda_cli.data.public import CORPORA

    assert set(CORPORA) == {"wikitext2"}
    named = public_sequences(data_dir, "valid", tokenizer, n=2, seq_len=16, source="wikitext2")
    assert torch.equal(named, public_sequences(data_dir, "valid", tokenizer, n=2, seq_len=16))
    with pytest.raises(DataError, match=r"public_data\.source 'ptb'"):
        public_sequences(data_dir, "valid", tokenizer, n=2, seq_len=16, source="ptb")  # type: ignore[arg-type]


# ---- align.text = "task_prompts": public sentences as task prompts -----------------------------


def test_task_prompts_fill_every_field_with_the_next_public_sentence():
    from fedsoda_cli.data.public import task_prompts

    articles = wikitext_articles(
        [" = Alpha = ", " The first sentence is here . Too short . The second one is here too . ", " = = Section = = "]
    )
    assert task_prompts(articles, "Review: {sentence}\nSentiment:") == [
        "Review: The first sentence is here\nSentiment:\n\n",
        "Review: The second one is here too\nSentiment:\n\n",
    ]
    # two fields take two sentences; a prompt that cannot be filled whole is dropped
    assert task_prompts(articles, "P: {passage} Q: {question}?") == [
        "P: The first sentence is here Q: The second one is here too?\n\n"
    ]
    assert task_prompts(articles, "{x}", max_words=2) == ["The first\n\n", "The second\n\n"]
    with pytest.raises(DataError, match="needs a task prompt with a {field}"):
        task_prompts(articles, "no field here")


def test_task_prompt_windows_are_cut_like_the_public_ones(data_dir, tokenizer):
    template = "Review: {sentence}\nSentiment:"
    windows = public_sequences(data_dir, "valid", tokenizer, n=4, seq_len=64, template=template)
    assert windows.shape == (4, 64)
    assert torch.equal(windows, public_sequences(data_dir, "valid", tokenizer, n=4, seq_len=64, template=template))
    text = tokenizer.decode(windows.reshape(-1).tolist())
    assert text.startswith("Review: Homarus gammarus , known as")
    assert text.count("\nSentiment:\n\nReview: ") >= 4  # several prompts per window, none answered
    assert not torch.equal(windows, public_sequences(data_dir, "valid", tokenizer, n=4, seq_len=64))
    bos = public_sequences(data_dir, "valid", _with_bos(tokenizer), n=2, seq_len=64, template=template)
    assert bos[:, 0].tolist() == [0, 0]


def test_align_reads_task_prompts_only_when_align_text_says_so():
    from fedsoda_cli.data.public import alignment_template
    from fedsoda_cli.spec.schema import Spec

    assert alignment_template(Spec.model_validate({})) is None
    assert alignment_template(Spec.model_validate({"align": {"text": "task_prompts"}})) == "Review: {sentence}\nSentiment:"
    custom = {"align": {"text": "task_prompts"}, "task": {"name": "sst2", "prompt": "Text: {sentence}\nMood:"}}
    assert alignment_template(Spec.model_validate(custom)) == "Text: {sentence}\nMood:"
    from fedsoda_cli.oda.realign import RealignConfig  # the server's realignment reads the same text

    assert RealignConfig.from_spec(Spec.model_validate(custom)).template == "Text: {sentence}\nMood:"
    assert RealignConfig.from_spec(Spec.model_validate({})).template is None
