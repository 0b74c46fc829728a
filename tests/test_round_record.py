"""RoundRecord: to_json() is a metrics.jsonl line and from_json() its exact inverse, which names the
first missing, unknown or ill-typed field. (A real run's lines: tests/federated/test_runtime.py.)"""

from __future__ import annotations

import copy
import json

import pytest

from fedsoda_cli.round_record import ClientProblem, DriftEntry, EvalEntry, RoundRecord, RoundRecordError

# a line as the server writes it on a round that evaluated, measured drift and realigned
LINE = {
    "bytes_down": 122472,
    "bytes_realign": 4096,
    "bytes_up": 122472,
    "clients": [0, 2, 3],
    "drift": {"after_realign": 0.004, "kl": 0.0008, "ratio": 0.15, "reference": 0.0053, "threshold": 1.5},
    "eval": {
        "sub": {
            "accuracy": 0.555,
            "ci95": [0.4857, 0.6221],
            "correct": 111,
            "count": 200,
            "label_shares": {"negative": 0.015, "positive": 0.985},
            "loss": 10.05,
            "seconds": 10.93,
        },
        "plugin": {
            "accuracy": 0.5,
            "ci95": [0.3, 0.7],
            "correct": 1,
            "count": 2,
            "label_shares": None,
            "loss": None,
            "seconds": 0.5,
        },
    },
    "excluded": [{"client": 2, "reason": "contains NaN or Inf"}],
    "failed": [],
    "global_digest": "ad3ecf2d16a23c4b",
    "round": 2,
    "seconds": 14.96,
    "step_seconds": 0.2768,
    "train_loss": 10.21,
    "train_seconds": 1.661,
    "train_seconds_by_worker": {"0": 0.9728, "1": 0.688},
    "updated": [0, 3],
    "worker_rss_mb": 553.8,
}


def test_from_json_and_to_json_are_inverse():
    record = RoundRecord.from_json(copy.deepcopy(LINE))
    assert record.to_json() == LINE
    assert json.dumps(record.to_json(), sort_keys=True) == json.dumps(LINE, sort_keys=True)
    assert record.excluded == [ClientProblem(2, "contains NaN or Inf")]
    assert record.eval["sub"].accuracy == 0.555 and record.eval["plugin"].label_shares is None
    assert record.drift == DriftEntry(kl=0.0008, reference=0.0053, ratio=0.15, threshold=1.5, after_realign=0.004)
    assert RoundRecord.from_json(record.to_json()) == record


def test_absent_parts_stay_absent():
    """eval, drift and drift.after_realign appear only on the rounds that have them."""
    line = {k: v for k, v in copy.deepcopy(LINE).items() if k != "eval"}
    del line["drift"]["after_realign"]
    record = RoundRecord.from_json(line)
    assert record.eval is None and record.drift.after_realign is None
    assert record.to_json() == line
    del line["drift"]
    assert "drift" not in RoundRecord.from_json(line).to_json()
    assert isinstance(EvalEntry.from_json(LINE["eval"]["sub"]), EvalEntry)


def _without(path):
    def change(line):
        *parents, last = path
        for key in parents:
            line = line[key]
        del line[last]

    return change


def _setting(path, value):
    def change(line):
        *parents, last = path
        for key in parents:
            line = line[key]
        line[last] = value

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (_without(["bytes_up"]), "field 'bytes_up' is missing"),
        (_without(["eval", "sub", "accuracy"]), "field 'eval.sub.accuracy' is missing"),
        (_without(["drift", "ratio"]), "field 'drift.ratio' is missing"),
        (_without(["excluded", 0, "reason"]), "field 'excluded[0].reason' is missing"),
        (_setting(["round"], "2"), "field 'round': expected a whole number, got str '2'"),
        (_setting(["round"], True), "field 'round': expected a whole number, got bool True"),
        (_setting(["bytes_realign"], 1.5), "field 'bytes_realign': expected a whole number, got float 1.5"),
        (_setting(["drift", "ratio"], None), "field 'drift.ratio': expected a number, got NoneType None"),
        (_setting(["clients", 1], "a"), "field 'clients': item 1: expected a whole number, got str 'a'"),
        (_setting(["eval", "sub", "ci95"], [0.1]), "field 'eval.sub.ci95': expected [low, high], got 1 value(s)"),
        (_setting(["train_seconds_by_worker", "1"], "x"), "field 'train_seconds_by_worker': key '1': expected a number"),
        (_setting(["eval"], None), "field 'eval': expected an object, got NoneType None"),
        (_setting(["surprise"], 1), "unknown field 'surprise'"),
        (_setting(["eval", "sub", "surprise"], 1), "unknown field 'eval.sub.surprise'"),
    ],
)
def test_from_json_names_the_bad_field(change, message):
    line = copy.deepcopy(LINE)
    change(line)
    with pytest.raises(RoundRecordError) as caught:
        RoundRecord.from_json(line)
    assert str(caught.value).startswith(message), str(caught.value)


def test_from_json_of_a_non_object():
    with pytest.raises(RoundRecordError, match=r"a round record: expected an object, got list \[1\]"):
        RoundRecord.from_json([1])
