import json
from collections import Counter

import pytest
from pydantic import ValidationError

from fedsoda_cli.data.tasks import BUILTIN, hub_row_to_record, load_task, read_jsonl
from fedsoda_cli.errors import DataError
from fedsoda_cli.spec.schema import TaskSpec


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- built-in tasks on the real files ------------------------------------------------------------


def test_sst2_eval_is_the_official_dev_split(data_dir):
    examples = load_task(TaskSpec(name="sst2"), data_dir, "eval", seed=0)
    assert len(examples) == 872
    assert Counter(e.label for e in examples) == {1: 444, 0: 428}
    first = examples[0]
    assert first.prompt == "Review: it 's a charming and often affecting journey .\nSentiment:"
    assert first.answer == " positive" == first.choices[first.label]
    assert first.id == "sst2-dev-0"


def test_sst2_train_limit_is_seeded_and_stratified(data_dir):
    spec = TaskSpec(name="sst2", train_examples=200)
    a = load_task(spec, data_dir, "train", seed=1)
    b = load_task(spec, data_dir, "train", seed=1)
    c = load_task(spec, data_dir, "train", seed=2)
    assert [e.id for e in a] == [e.id for e in b]
    assert [e.id for e in a] != [e.id for e in c]
    assert len(a) == 200 and len({e.id for e in a}) == 200
    # label shares as in the full train split (37,569 positive of 67,349): 200 * 0.558 = 111.6
    assert Counter(e.label for e in a)[1] == 112


def test_boolq_derived_split_sizes_and_disjointness(data_dir):
    spec = TaskSpec(name="boolq", boolq_eval_size=1000)
    train = load_task(spec, data_dir, "train", seed=0)
    evals = load_task(spec, data_dir, "eval", seed=0)
    assert len(train) == 2270 and len(evals) == 1000
    assert not {e.id for e in train} & {e.id for e in evals}
    assert len({e.id for e in train} | {e.id for e in evals}) == 3270
    other = load_task(spec, data_dir, "eval", seed=1)
    assert {e.id for e in other} != {e.id for e in evals}
    e = evals[0]
    assert e.prompt.startswith("Passage: ") and e.prompt.endswith("?\nAnswer:")
    assert e.choices == [" no", " yes"] and e.answer == e.choices[e.label]


def test_boolq_eval_size_too_large(data_dir):
    with pytest.raises(DataError, match="task.boolq_eval_size"):
        load_task(TaskSpec(name="boolq", boolq_eval_size=5000), data_dir, "train", seed=0)


def test_gsm8k_prompt_and_answer(data_dir):
    examples = load_task(TaskSpec(name="gsm8k", eval_examples=5), data_dir, "eval", seed=0)
    assert len(examples) == 5
    e = examples[0]
    assert e.prompt.startswith("Question: ") and e.prompt.endswith("\nAnswer:")
    assert e.answer.startswith(" ") and "####" in e.answer
    assert e.label is None and e.choices is None


def test_limit_larger_than_split_uses_all(data_dir):
    assert len(load_task(TaskSpec(name="sst2", eval_examples=10_000), data_dir, "eval", seed=0)) == 872


def test_eval_subset_independent_of_train_limit(data_dir):
    a = load_task(TaskSpec(name="sst2", eval_examples=20, train_examples=5), data_dir, "eval", seed=0)
    b = load_task(TaskSpec(name="sst2", eval_examples=20, train_examples=50), data_dir, "eval", seed=0)
    assert [e.id for e in a] == [e.id for e in b]


def test_custom_prompt_template(data_dir):
    spec = TaskSpec(name="sst2", prompt="Text: {sentence}\nLabel {{0/1}}:", eval_examples=3)
    e = load_task(spec, data_dir, "eval", seed=0)[0]
    assert e.prompt.startswith("Text: ") and e.prompt.endswith("\nLabel {0/1}:")


def test_unknown_template_field(data_dir):
    with pytest.raises(DataError, match=r"task\.prompt uses \{text\}.*sentence"):
        load_task(TaskSpec(name="sst2", prompt="Review: {text}"), data_dir, "eval", seed=0)


@pytest.mark.parametrize(
    "template", ["Review: {}", "Review: {sentence", "Review: {0}", "{sentence:d}", "{sentence!x}", "{label.real.foo}"]
)
def test_malformed_template(data_dir, template):
    with pytest.raises(ValidationError, match=r"task\.prompt"):  # refused by validate already
        TaskSpec(name="sst2", prompt=template)
    # a spec that skipped validation still fails with the record named, never a traceback
    with pytest.raises(DataError, match=r"task\.prompt"):
        load_task(
            TaskSpec.model_construct(**{**TaskSpec().model_dump(), "name": "sst2", "prompt": template}), data_dir, "eval", seed=0
        )


# ---- errors on broken files ---------------------------------------------------------------------


def test_missing_task_file_names_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "gsm8k" / "train.jsonl")):
        load_task(TaskSpec(name="gsm8k"), tmp_path, "train", seed=0)


def test_bad_json_line_has_line_number(tmp_path):
    write_jsonl(tmp_path / "sst2/dev.jsonl", [{"sentence": "ok", "label": 1}, "{not json", {"sentence": "x", "label": 0}])
    with pytest.raises(DataError, match=r"sst2/dev\.jsonl:2: not valid JSON"):
        load_task(TaskSpec(name="sst2"), tmp_path, "eval", seed=0)


def test_missing_field_has_line_number(tmp_path):
    write_jsonl(tmp_path / "sst2/dev.jsonl", [{"sentence": "ok", "label": 1}, {"sentence": "no label"}])
    with pytest.raises(DataError, match=r"dev\.jsonl:2: record has no \(or an empty\) field 'label'"):
        load_task(TaskSpec(name="sst2"), tmp_path, "eval", seed=0)


def test_bad_label_value(tmp_path):
    write_jsonl(tmp_path / "sst2/dev.jsonl", [{"sentence": "ok", "label": 3}])
    with pytest.raises(DataError, match=r"dev\.jsonl:1: 'label' is 3"):
        load_task(TaskSpec(name="sst2"), tmp_path, "eval", seed=0)


def test_non_object_line(tmp_path):
    write_jsonl(tmp_path / "gsm8k/test.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"test\.jsonl:1: a JSON list, not an object"):
        load_task(TaskSpec(name="gsm8k"), tmp_path, "eval", seed=0)


def test_empty_file(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2/dev.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no records"):
        load_task(TaskSpec(name="sst2"), tmp_path, "eval", seed=0)


def test_error_messages_are_one_line(tmp_path):
    write_jsonl(tmp_path / "sst2/dev.jsonl", ["{oops"])
    with pytest.raises(DataError) as err:
        load_task(TaskSpec(name="sst2"), tmp_path, "eval", seed=0)
    assert "\n" not in str(err.value)


def test_read_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    records = read_jsonl(path)
    assert [(r.where.rsplit(":", 1)[1], r.index, r.fields["a"]) for r in records] == [("1", 0, 1), ("3", 1, 2)]


# ---- the user's own files (task.name = jsonl) ---------------------------------------------------


def test_user_jsonl_relative_to_spec_dir(tmp_path):
    write_jsonl(tmp_path / "mine/train.jsonl", [{"q": "2+2", "a": "4"}, {"q": "3+3", "a": "\n6"}])
    spec = TaskSpec(name="jsonl", train_file="mine/train.jsonl", input_field="q", output_field="a")
    examples = load_task(spec, None, "train", seed=0, spec_dir=tmp_path)
    assert [(e.prompt, e.answer) for e in examples] == [("Input: 2+2\nOutput:", " 4"), ("Input: 3+3\nOutput:", "\n6")]
    assert examples[0].id == "train-0" and examples[0].label is None


def test_user_csv_through_datasets(tmp_path):
    (tmp_path / "t.csv").write_text("input,output\nhello,world\nfoo,bar\n")
    spec = TaskSpec(name="jsonl", eval_file=str(tmp_path / "t.csv"), prompt="Say {input}:")
    examples = load_task(spec, None, "eval", seed=0)
    assert [(e.prompt, e.answer) for e in examples] == [("Say hello:", " world"), ("Say foo:", " bar")]


def test_user_csv_keeps_text_as_written_and_numbers_lines(tmp_path):
    (tmp_path / "t.csv").write_text("input,output\n007,NA\nx,\n")
    spec = TaskSpec(name="jsonl", train_file="t.csv")
    with pytest.raises(DataError, match=r"t\.csv:3: record has no \(or an empty\) field 'output'"):
        load_task(spec, None, "train", seed=0, spec_dir=tmp_path)
    (tmp_path / "t.csv").write_text("input,output\n007,NA\n")
    e = load_task(spec, None, "train", seed=0, spec_dir=tmp_path)[0]
    assert (e.prompt, e.answer) == ("Input: 007\nOutput:", " NA")


def test_user_parquet_through_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input": ["a", "b"], "output": ["1", "2"]}), tmp_path / "t.parquet")
    examples = load_task(TaskSpec(name="jsonl", train_file="t.parquet"), None, "train", seed=0, spec_dir=tmp_path)
    assert [e.answer for e in examples] == [" 1", " 2"]


def test_user_file_missing_names_key(tmp_path):
    with pytest.raises(DataError, match=r"task\.eval_file = 'nope\.jsonl'"):
        load_task(TaskSpec(name="jsonl", eval_file="nope.jsonl"), None, "eval", seed=0, spec_dir=tmp_path)
    with pytest.raises(DataError, match=r"needs task\.train_file"):
        load_task(TaskSpec(name="jsonl"), None, "train", seed=0)


def test_user_missing_output_field_names_line_and_key(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"input": "x", "output": "y"}, {"input": "z"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: record has no \(or an empty\) field 'output' \(task\.output_field\)"):
        load_task(TaskSpec(name="jsonl", train_file="d.jsonl"), None, "train", seed=0, spec_dir=tmp_path)


def test_user_unknown_file_type(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        load_task(TaskSpec(name="jsonl", train_file="d.txt"), None, "train", seed=0, spec_dir=tmp_path)


# ---- hub fallback mapping (no network here: mapping on constructed rows) -------------------------


def test_hub_sst2_row_matches_local_format():
    rec = hub_row_to_record("sst2", {"sentence": "it 's a charming and often affecting journey . ", "label": 1, "idx": 0})
    assert rec == {"sentence": "it 's a charming and often affecting journey .", "label": 1}


def test_hub_boolq_and_gsm8k_rows():
    assert hub_row_to_record("boolq", {"question": "q", "answer": True, "passage": "p"}) == {
        "question": "q",
        "passage": "p",
        "answer": True,
        "title": "",
    }
    assert hub_row_to_record("gsm8k", {"question": "q", "answer": "a\n#### 3"}) == {"question": "q", "answer": "a\n#### 3"}
    with pytest.raises(ValueError):
        hub_row_to_record("jsonl", {})


def test_hub_rows_give_the_same_examples_as_local_files(tmp_path, monkeypatch):
    """load_task over mapped hub rows == load_task over the equivalent local file."""
    import datasets

    hub_rows = [{"sentence": f"sentence {i} ", "label": i % 2, "idx": i} for i in range(6)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hub_rows)
    from_hub = load_task(TaskSpec(name="sst2"), None, "eval", seed=0)
    write_jsonl(tmp_path / "sst2/dev.jsonl", [{"sentence": f"sentence {i}", "label": i % 2} for i in range(6)])
    local = load_task(TaskSpec(name="sst2"), tmp_path, "eval", seed=0)
    assert from_hub == local


def test_hub_failure_is_a_data_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"hub openai/gsm8k/main\[test\].*data\.dir"):
        load_task(TaskSpec(name="gsm8k"), None, "eval", seed=0)


def test_builtin_table_covers_all_builtin_tasks():
    assert set(BUILTIN) == {"sst2", "boolq", "gsm8k"}


def test_val_split_is_disjoint_stratified_and_leaves_training_unchanged(data_dir):
    task = TaskSpec(name="sst2", train_examples=200, val_examples=60)
    train = load_task(task, data_dir, "train", seed=0)
    val = load_task(task, data_dir, "val", seed=0)
    assert len(val) == 60 and not {e.id for e in val} & {e.id for e in train}
    assert not {e.id for e in val} & {e.id for e in load_task(task, data_dir, "eval", seed=0)}
    assert 20 <= sum(e.label for e in val) <= 40  # label balance kept
    no_val = TaskSpec(name="sst2", train_examples=200, val_examples=0)
    assert [e.id for e in load_task(no_val, data_dir, "train", seed=0)] == [e.id for e in train]
    assert load_task(no_val, data_dir, "val", seed=0) == []


def test_val_split_is_empty_when_training_takes_every_example(tmp_path):
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"input": f"q{i}", "output": "a"}) + "\n" for i in range(5)))
    task = TaskSpec(name="jsonl", train_file="t.jsonl")
    assert len(load_task(task, None, "train", seed=0, spec_dir=tmp_path)) == 5
    assert load_task(task, None, "val", seed=0, spec_dir=tmp_path) == []


def test_an_empty_validation_slice_is_a_spec_error_naming_the_key_that_needs_it(tmp_path):
    from fedsoda_cli.data.tasks import validation_slice
    from fedsoda_cli.errors import SpecError
    from fedsoda_cli.spec.load import load_spec

    for name in ("train.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"input": f"q{i}", "output": "a"}) + "\n" for i in range(5)))
    task = '[task]\nname = "jsonl"\ntrain_file = "train.jsonl"\neval_file = "eval.jsonl"\nval_examples = 2\n'
    (tmp_path / "spec.toml").write_text(task + 'train_examples = 5\n[eval]\nplugin_scale = "val"\n')
    spec = load_spec(tmp_path / "spec.toml")
    with pytest.raises(
        SpecError, match=r'eval.plugin_scale = "val" needs validation examples, .* or set eval.plugin_scale to a number'
    ):
        validation_slice(spec, 'eval.plugin_scale = "val"', "set eval.plugin_scale to a number")
    (tmp_path / "spec.toml").write_text(task + "train_examples = 3\n")
    spec = load_spec(tmp_path / "spec.toml")
    assert [e.prompt for e in validation_slice(spec, "x", "y")] and len(validation_slice(spec, "x", "y")) == 2


def test_user_classification_task_with_choices(tmp_path):
    rows = [{"input": "sky", "output": "blue"}, {"input": "rose", "output": " red"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = TaskSpec(name="jsonl", train_file="t.jsonl", choices=["red", " blue"])
    examples = load_task(task, None, "train", seed=0, spec_dir=tmp_path)
    assert [(e.label, e.answer, e.choices) for e in examples] == [(1, " blue", [" red", " blue"]), (0, " red", [" red", " blue"])]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"input": "x", "output": "green"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'output' is 'green', not one of task.choices"):
        load_task(
            TaskSpec(name="jsonl", train_file="bad.jsonl", choices=["red", "blue"]), None, "train", seed=0, spec_dir=tmp_path
        )
