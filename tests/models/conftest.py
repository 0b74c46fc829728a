"""Shared fixtures for the model tests: one torch thread (the machine's cores are shared) and the
tiny built-in models."""

import pytest
import torch

from fedsoda_cli.models.load import load_causal_lm
from fedsoda_cli.spec.schema import ModelSpec

TINY_NAMES = ["tiny-random-llama", "tiny-random-qwen2"]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(params=TINY_NAMES)
def tiny(request):
    """(model, tokenizer) of each tiny built-in model, freshly built (so tests may prune it)."""
    return load_causal_lm(ModelSpec(name=request.param))
