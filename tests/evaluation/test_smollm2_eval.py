"""The real SmolLM2-135M: label-word scoring is far above chance on SST-2, held-out perplexity is
in the range of a trained 135M model, and GSM8K generation produces answers with numbers."""

import pytest

from fedsoda_cli.data.paths import resolve_data_dir
from fedsoda_cli.data.public import public_sequences
from fedsoda_cli.data.tasks import load_task
from fedsoda_cli.evaluation.perplexity import perplexity
from fedsoda_cli.evaluation.task import evaluate_task
from fedsoda_cli.models.load import load_causal_lm
from fedsoda_cli.spec.schema import DataSpec, ModelSpec, TaskSpec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_causal_lm(ModelSpec(name="smollm2-135m"))
    except Exception as exc:  # the wheel is not installed here
        pytest.skip(f"SmolLM2 unavailable: {exc}")


@pytest.fixture(scope="module")
def data_dir():
    found = resolve_data_dir(DataSpec(), None)
    if found is None:
        pytest.skip("../shared/data is not available")
    return found


def test_zero_shot_sst2_is_well_above_chance(smollm2, data_dir):
    model, tokenizer = smollm2
    examples = load_task(TaskSpec(name="sst2", eval_examples=64), data_dir, "eval", 0)
    score = evaluate_task(model, tokenizer, "sst2", examples, batch_size=8, max_len=256, max_new_tokens=1)
    # measured 49/64 = 0.766; chance is 0.5 and the lower end of the 95 % interval must clear it
    assert score.ci95[0] > 0.5


def test_heldout_perplexity_and_gsm8k_generation(smollm2, data_dir):
    model, tokenizer = smollm2
    windows = public_sequences(data_dir, "test", tokenizer, 4, 128)
    assert 15 < perplexity(model, windows, batch_size=4).perplexity < 120  # measured 48.8 on 8 windows
    examples = load_task(TaskSpec(name="gsm8k", eval_examples=2), data_dir, "eval", 0)
    score = evaluate_task(model, tokenizer, "gsm8k", examples, batch_size=2, max_len=256, max_new_tokens=48)
    # the untuned model may stop at once (measured: " 12\n\nThe answer is: 12" and ""), but what it
    # says is cut before a new question and its number is extracted
    assert any(p.prediction is not None for p in score.predictions)
    assert all("Question:" not in p.output for p in score.predictions)
