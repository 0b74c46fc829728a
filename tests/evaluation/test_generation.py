"""GSM8K generation path on the tiny model, stop handling and exact match."""

from fedsoda_cli.data.tasks import Example
from fedsoda_cli.evaluation.generation import cut_at_stop, generate_answers, numeric_match, text_match
from fedsoda_cli.evaluation.task import evaluate_task


def _gsm8k(n):
    return [
        Example(
            f"gsm8k-test-{i}",
            f"Question: What is {i} plus {i + 1}?\nAnswer:",
            f" {i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}",
            None,
            None,
        )
        for i in range(n)
    ]


def test_generation_runs_greedy_and_batching_keeps_outputs(tiny):
    model, tokenizer = tiny
    prompts = [e.prompt for e in _gsm8k(3)] + ["Question: a much longer question that needs padding in its batch?\nAnswer:"]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=6, max_len=256, batch_size=4)
    alone = [generate_answers(model, tokenizer, [p], max_new_tokens=6, max_len=256, batch_size=1)[0] for p in prompts]
    assert len(batched) == 4 and all(isinstance(t, str) for t in batched)
    assert batched == alone  # left padding must not shift positions
    assert (
        generate_answers(model, tokenizer, prompts[:1], max_new_tokens=6, max_len=256, batch_size=1) == alone[:1]
    )  # greedy: deterministic


def test_evaluate_task_on_gsm8k_counts_exact_matches(tiny):
    model, tokenizer = tiny
    examples = _gsm8k(2)
    score = evaluate_task(model, tokenizer, "gsm8k", examples, batch_size=2, max_len=256, max_new_tokens=5)
    assert score.count == 2 and score.metric.startswith("exact match")
    assert [p.gold for p in score.predictions] == ["1", "3"]
    for p in score.predictions:
        assert p.output is not None and p.correct == (p.prediction == p.gold)


def test_stop_string_and_answer_extraction():
    text = " She pays 3 * 4 = 12 dollars.\n#### 12\n\nQuestion: Tom has 5 apples"
    assert cut_at_stop(text) == " She pays 3 * 4 = 12 dollars.\n#### 12"
    assert numeric_match(cut_at_stop(text), " 3 * 4 = 12\n#### 12") == ("12", "12", True)
    assert numeric_match("It is 1,200.0 dollars", "#### 1200") == ("1200", "1200", True)
    assert numeric_match("no idea", "#### 7") == (None, "7", False)
    assert text_match("  Paris\nmore text", " Paris") == ("Paris", "Paris", True)
