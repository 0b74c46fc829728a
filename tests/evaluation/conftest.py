"""Fixtures for the evaluation tests: one torch thread and the tiny random llama with its tokenizer."""

import pytest
import torch

from fedsoda_cli.data.tasks import Example
from fedsoda_cli.models.load import load_causal_lm
from fedsoda_cli.spec.schema import ModelSpec


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of tiny-random-llama; tests must not modify the model in place."""
    return load_causal_lm(ModelSpec(name="tiny-random-llama"))


@pytest.fixture
def sst2_like():
    """Five classification examples of different lengths (so batches need padding)."""
    sentences = [
        "a gripping, funny film",
        "dull",
        "the plot wanders and the actors look bored throughout the film",
        "wonderful",
        "not bad at all, really quite lovely in places",
    ]
    return [
        Example(
            f"ex-{i}",
            f"Review: {s}\nSentiment:",
            " positive" if i % 2 == 0 else " negative",
            1 if i % 2 == 0 else 0,
            [" negative", " positive"],
        )
        for i, s in enumerate(sentences)
    ]
