"""Bad data through the CLI against a complete run: a missing data folder or file, a JSONL task file
with a broken line, a record without its field, an empty file, and a client left without examples.
Each is exit code 5 with one line naming the file (and line) and the fix; nothing is changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import (
    assert_fails,
    assert_no_scratch_left,
    assert_one_line_error,
    fedsoda,
    fedsoda_process,
    snapshot,
)

GOOD = '{"input": "a fine film", "output": "positive"}\n'


def test_data_folder_missing(spec_path, workdir, tmp_path):
    before = snapshot(workdir)
    result = fedsoda("profile", spec_path, "--workdir", workdir, "--set", f"data.dir='{tmp_path / 'nope'}'")
    assert_fails(result, "data", f"data folder {tmp_path / 'nope'}", "does not exist", "fix data.dir in the spec or remove it")
    assert snapshot(workdir) == before
    assert_no_scratch_left(workdir)


def test_data_file_missing(spec_path, workdir, tmp_path):
    before = snapshot(workdir)
    empty = tmp_path / "data"
    empty.mkdir()
    result = fedsoda("profile", spec_path, "--workdir", workdir, "--set", f"data.dir='{empty}'")
    assert_fails(result, "data", f"data file {empty}/wikitext2/wiki.valid.raw not found", "put wikitext2/wiki.valid.raw into")
    assert snapshot(workdir) == before
    assert_no_scratch_left(workdir)


TASK_FILE_CASES = {
    # case: (train file content, needles: file and line, what is wrong, how to fix)
    "a line that is not JSON": (GOOD + "{not json\n", [":2: not valid JSON", "make every line one JSON object"]),
    "a line that is not an object": (GOOD + "[1, 2]\n", [":2: a JSON list, not an object", "make every line one JSON object"]),
    "a record without its output field": (
        GOOD + '{"input": "dull"}\n',
        [":2: record has no (or an empty) field 'output' (task.output_field)", "fill it in every record or fix the spec"],
    ),
    "an empty file": ("", ["has no records", "fill it"]),
    "a client left without examples": (
        GOOD,
        [
            "client 1 of 2 gets no training example (iid partition of 1 examples)",
            "use fewer federate.clients or more task.train_examples",
        ],
    ),
}


@pytest.mark.parametrize("case", TASK_FILE_CASES)
def test_bad_task_file(case, spec_path, workdir, tmp_path):
    """A user task in JSONL files (task.name = 'jsonl'), read by federate before any worker starts."""
    content, needles = TASK_FILE_CASES[case]
    train = tmp_path / "train.jsonl"
    train.write_text(content)
    (tmp_path / "eval.jsonl").write_text(GOOD)
    before = snapshot(workdir)  # round checkpoints included: a failed start must not clear them
    result = fedsoda("federate", spec_path, "--workdir", workdir, *task_files(train, tmp_path / "eval.jsonl"))
    line = assert_fails(result, "data", *needles)
    assert str(train) in line or case == "a client left without examples"
    assert snapshot(workdir) == before
    assert_no_scratch_left(workdir)


def test_task_file_missing(spec_path, workdir, tmp_path):
    before = snapshot(workdir)
    result = fedsoda("federate", spec_path, "--workdir", workdir, *task_files(tmp_path / "gone.jsonl", tmp_path / "gone.jsonl"))
    assert_fails(result, "data", "task.train_file", f"file {tmp_path / 'gone.jsonl'} not found", "fix task.train_file")
    assert snapshot(workdir) == before


def task_files(train: Path, evaluation: Path) -> list[str]:
    return [
        "--set",
        "task.name='jsonl'",
        "--set",
        f"task.train_file='{train}'",
        "--set",
        f"task.eval_file='{evaluation}'",
        "--set",
        "task.output_field='output'",
    ]


def test_a_bad_task_file_as_a_real_process(spec_path, workdir, tmp_path):
    """stderr as CI sees it: the one line, and nothing from the libraries the federate stage imports."""
    train = tmp_path / "train.jsonl"
    train.write_text(GOOD + "{not json\n")
    done = fedsoda_process("federate", spec_path, "--workdir", workdir, *task_files(train, train))
    assert_one_line_error(done.returncode, done.stderr, 5, f"{train}:2: not valid JSON", "make every line one JSON object")
