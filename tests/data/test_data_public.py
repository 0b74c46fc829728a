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
