"""One entry point that evaluates a model on a task's eval examples, whatever the task kind.

Classification tasks (examples with `choices`: SST-2, BoolQ) are scored by label-word
log-likelihood and measured by accuracy; generation tasks by greedy generation and exact match
(GSM8K: the final number; jsonl tasks: the first line of text). Either way the task metric is
called accuracy: the share of examples answered right.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from fedsoda_cli.evaluation.generation import generate_answers, numeric_match, text_match
from fedsoda_cli.evaluation.scoring import label_word_logprobs
from fedsoda_cli.evaluation.stats import wilson_interval

LABEL_WORDS = "label-word accuracy"
NUMERIC = "exact match (final number)"
TEXT = "exact match (first line)"


@dataclass
class Prediction:
    """One example's outcome. `scores`: label-word log-likelihoods; `output`: the generated text."""

    id: str
    prediction: str | None
    gold: str | None
    correct: bool
    scores: list[float] | None = None
    output: str | None = None

    def record(self, target: str) -> dict:
        """The predictions.jsonl line of this prediction for `target` (None fields left out)."""
        return {"target": target, **{k: v for k, v in asdict(self).items() if v is not None or k in ("prediction", "gold")}}


@dataclass
class TaskScore:
    """Accuracy of a model on a task: `correct` of `count`, with its 95 % Wilson interval."""

    task: str
    metric: str
    correct: int
    count: int
    predictions: list[Prediction] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.count)

    def label_word_loss(self, examples: Sequence) -> float | None:
        """Mean negative log-likelihood of the gold label word over `examples` (the ones scored, in
        order); None for generation tasks or examples without a label."""
        scored = [p.scores[e.label] for e, p in zip(examples, self.predictions) if p.scores is not None and e.label is not None]
        return -sum(scored) / len(scored) if scored else None

    def summary(self) -> dict:
        """The results.json entry: task, metric, accuracy, correct, count, ci95."""
        lo, hi = self.ci95
        return {
            "task": self.task,
            "metric": self.metric,
            "accuracy": self.accuracy,
            "correct": self.correct,
            "count": self.count,
            "ci95": [lo, hi],
        }


def evaluate_task(
    model,
    tokenizer,
    task: str,
    examples: Sequence,
    *,
    batch_size: int,
    max_len: int,
    max_new_tokens: int,
    advance: Callable[[int], None] | None = None,
) -> TaskScore:
    """Score `model` on `examples` of task `task` (sst2, boolq, gsm8k, jsonl). `advance(k)`: k examples done."""
    if not examples:
        raise ValueError(f"task {task}: no eval examples")
    if examples[0].choices:
        return _classify(model, tokenizer, task, examples, batch_size, max_len, advance)
    outputs = generate_answers(
        model,
        tokenizer,
        [e.prompt for e in examples],
        max_new_tokens=max_new_tokens,
        max_len=max_len,
        batch_size=batch_size,
        advance=advance,
    )
    match = numeric_match if task == "gsm8k" else text_match
    predictions = []
    for example, output in zip(examples, outputs):
        predicted, gold, correct = match(output, example.answer)
        predictions.append(Prediction(example.id, predicted, gold, correct, output=output))
    return TaskScore(
        task, NUMERIC if task == "gsm8k" else TEXT, sum(p.correct for p in predictions), len(predictions), predictions
    )


def evaluate_for_spec(spec, model, tokenizer, examples: Sequence, advance: Callable[[int], None] | None = None) -> TaskScore:
    """`evaluate_task` with a run's task and [eval] settings: how eval, the server's per-round
    evaluation and the plug-in scale's choice all score a model, so they cannot drift apart."""
    return evaluate_task(
        model,
        tokenizer,
        spec.task.name,
        examples,
        batch_size=spec.eval.batch_size,
        max_len=spec.task.max_len,
        max_new_tokens=spec.eval.max_new_tokens,
        advance=advance,
    )


def _classify(model, tokenizer, task, examples, batch_size, max_len, advance) -> TaskScore:
    scores = label_word_logprobs(model, tokenizer, examples, max_len=max_len, batch_size=batch_size, advance=advance)
    predictions = []
    for example, row in zip(examples, scores):
        best = max(range(len(row)), key=row.__getitem__)
        gold = example.choices[example.label].strip() if example.label is not None else example.answer.strip()
        predicted = example.choices[best].strip()
        correct = best == example.label if example.label is not None else predicted == gold
        predictions.append(Prediction(example.id, predicted, gold, correct, scores=row))
    return TaskScore(task, LABEL_WORDS, sum(p.correct for p in predictions), len(predictions), predictions)
