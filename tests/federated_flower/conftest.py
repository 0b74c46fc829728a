"""Fixtures for the Flower backend: the federated tests' tiny quantized sub-LLM and prepared workdirs."""

import pytest

pytest.importorskip("flwr", reason='the Flower backend is an extra: pip install "fedsoda[flower]"')

from tests.federated.conftest import _one_thread, sub_llm  # noqa: F401  (fixtures, re-exported for these tests)
