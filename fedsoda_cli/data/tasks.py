"""Client task data: records -> `Example`s (prompt, answer, label), identical in training and eval.

Sources (`data_dir` from `paths.resolve_data_dir`; None = the Hugging Face hub):

| task  | train                          | eval                          | prompt (default)                                       | label words         |
|-------|--------------------------------|-------------------------------|--------------------------------------------------------|---------------------|
| sst2  | sst2/train.jsonl               | sst2/dev.jsonl (GLUE dev)     | "Review: {sentence}\\nSentiment:"                        | " negative"/" positive" |
| boolq | boolq/dev.jsonl minus eval     | task.boolq_eval_size of dev   | "Passage: {passage}\\nQuestion: {question}?\\nAnswer:"    | " no"/" yes"        |
| gsm8k | gsm8k/train.jsonl              | gsm8k/test.jsonl              | "Question: {question}\\nAnswer:"                         | - (answer = " " + solution) |
| jsonl | task.train_file                | task.eval_file                | "Input: {<input_field>}\\nOutput:"                        | - (answer = " " + output)  |

BoolQ: only the official dev split is available here, so train/eval are a *derived* split of it: a
seeded permutation of the dev examples; the first `task.boolq_eval_size` are eval, the rest train.
The hub fallback uses the same derived split of google/boolq's validation split, so results do not
depend on where the data came from.

Limits (`task.train_examples` / `task.eval_examples`, 0 = all) take a seeded subset, stratified by
label for classification tasks (label shares as in the source), returned in source order.

The "val" split (federate's per-round evaluation) is drawn, stratified and seeded, from the
training split's examples that the train subset left unused: disjoint from what any client trains
on and from the reported eval split, and taking it never changes the training examples.
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedsoda_cli.data.answers import extract_gsm8k_answer  # noqa: F401  (part of this module's API)
from fedsoda_cli.data.paths import data_file
from fedsoda_cli.data.sft import sft_batch  # noqa: F401  (part of this module's API)
from fedsoda_cli.errors import DataError
from fedsoda_cli.spec.schema import TaskSpec

log = logging.getLogger(__name__)

Split = Literal["train", "val", "eval"]


@dataclass(frozen=True)
class Record:
    """One source record: its fields, its 0-based position in the source, and where it is (for messages)."""

    where: str  # "path:line", "path row i" or "hub ... row i"
    index: int
    fields: dict[str, Any]


@dataclass
class Example:
    """One task example. SFT trains on `prompt` + `answer` (+ eos) with loss on the answer only.

    For classification, `choices` are the label words and `answer == choices[label]`; for
    generation tasks `label` and `choices` are None.
    """

    id: str
    prompt: str
    answer: str
    label: int | None
    choices: list[str] | None


@dataclass(frozen=True)
class _Builtin:
    template: str
    required: tuple[str, ...]
    choices: tuple[str, ...] | None
    files: dict[str, str]  # split -> path inside the data folder
    hub: tuple[str, str | None, dict[str, str]]  # (hub id, config, split -> hub split)


BUILTIN: dict[str, _Builtin] = {
    "sst2": _Builtin(
        template="Review: {sentence}\nSentiment:",
        required=("sentence", "label"),
        choices=(" negative", " positive"),
        files={"train": "sst2/train.jsonl", "eval": "sst2/dev.jsonl"},
        hub=("nyu-mll/glue", "sst2", {"train": "train", "eval": "validation"}),
    ),
    "boolq": _Builtin(
        template="Passage: {passage}\nQuestion: {question}?\nAnswer:",
        required=("question", "passage", "answer"),
        choices=(" no", " yes"),
        files={"train": "boolq/dev.jsonl", "eval": "boolq/dev.jsonl"},
        hub=("google/boolq", None, {"train": "validation", "eval": "validation"}),
    ),
    "gsm8k": _Builtin(
        template="Question: {question}\nAnswer:",
        required=("question", "answer"),
        choices=None,
        files={"train": "gsm8k/train.jsonl", "eval": "gsm8k/test.jsonl"},
        hub=("openai/gsm8k", "main", {"train": "train", "eval": "test"}),
    ),
}


def generates(task: TaskSpec) -> bool:
    """Whether the task's eval generates an answer (no label words to score)."""
    if task.name == "jsonl":
        return not task.choices
    return BUILTIN[task.name].choices is None


def prompt_template(task: TaskSpec) -> str:
    """The template every prompt of `task` is rendered from: `task.prompt`, else the built-in
    task's, else (jsonl) "Input: {<task.input_field>}\nOutput:"."""
    if task.prompt:
        return task.prompt
    if task.name == "jsonl":
        return f"Input: {{{task.input_field}}}\nOutput:"
    return BUILTIN[task.name].template


def trains_eos(task: TaskSpec) -> bool:
    """Whether SFT's loss covers the eos after the answer: `task.train_eos`, by default only for
    generating tasks. A scored task never needs the eos, and on a model that has not seen it there
    it is the larger half of the early loss (measured on SmolLM2, SST-2)."""
    return generates(task) if task.train_eos is None else task.train_eos


# Independent random streams per purpose, so e.g. changing eval_examples never moves the train subset.
_STREAM_BOOLQ_SPLIT, _STREAM_SUBSET = 1, {"train": 2, "eval": 3, "val": 4}


def load_task(task: TaskSpec, data_dir: Path | None, split: Split, seed: int, *, spec_dir: Path | None = None) -> list[Example]:
    """The examples of `task` for `split` ("train" or "eval"), deterministic given `seed`.

    `data_dir` None loads the built-in tasks from the hub. `spec_dir` resolves relative
    `task.train_file` / `task.eval_file` (jsonl task; default: the working directory).
    Raises DataError for missing files, malformed records, bad templates and empty datasets.
    """
    if split not in ("train", "val", "eval"):
        raise ValueError(f"split must be 'train', 'val' or 'eval', got {split!r}")
    source_split: Split = "eval" if split == "eval" else "train"
    if task.name == "jsonl":
        records, source = _user_records(task, source_split, spec_dir)
        examples = _user_examples(task, records, source)
    else:
        records, source = _builtin_records(task, data_dir, source_split, seed)
        examples = _builtin_examples(task, records, source, source_split)
    if split == "eval":
        return _limit(examples, task.eval_examples, seed, "eval")
    train = _limit(examples, task.train_examples, seed, "train")
    if split == "train":
        return train
    used = {e.id for e in train}
    unused = [e for e in examples if e.id not in used]
    return _limit(unused, task.val_examples, seed, "val") if task.val_examples else []


# ---- reading records ---------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[Record]:
    """The JSON objects of a JSONL file, one per non-blank line, located by "path:line"."""
    records: list[Record] = []
    # Binary mode, decoding line by line, so that a byte that is not UTF-8 is reported at its line.
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg}); make every line one JSON object") from None
            except RecursionError:
                raise DataError(f"{where}: JSON nested too deeply to read; make every line one flat JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: a JSON {type(obj).__name__}, not an object; make every line one JSON object")
            records.append(Record(where, len(records), obj))
    return records


def _builtin_records(task: TaskSpec, data_dir: Path | None, split: Split, seed: int) -> tuple[list[Record], str]:
    """Records of a built-in task's split (local file, else hub), with the BoolQ derived split applied."""
    if data_dir is not None:
        path = data_file(data_dir, BUILTIN[task.name].files[split])
        records, source = read_jsonl(path), str(path)
    else:
        records, source = _hub_records(task.name, split)
    _require_nonempty(records, source)
    if task.name == "boolq":
        records = _boolq_derived_split(records, task.boolq_eval_size, split, seed, source)
    return records, source


def _hub_records(name: str, split: Split) -> tuple[list[Record], str]:
    hub_id, config, splits = BUILTIN[name].hub
    source = f"hub {hub_id}" + (f"/{config}" if config else "") + f"[{splits[split]}]"
    import datasets  # imported lazily: slow, and only needed without a local data folder

    try:
        rows = datasets.load_dataset(hub_id, config, split=splits[split])
    except Exception as exc:  # network, auth or hub layout problems all get the same fix
        raise DataError(
            f"could not load {source} ({type(exc).__name__}: {exc}); set data.dir or $FEDSODA_DATA to a local data folder"
        ) from None
    return [Record(f"{source} row {i}", i, hub_row_to_record(name, row)) for i, row in enumerate(rows)], source


def hub_row_to_record(name: str, row: dict[str, Any]) -> dict[str, Any]:
    """Map one hub row to the local JSONL record format of task `name` (see shared/data/README.md).

    glue/sst2 {"sentence", "label", "idx"} -> {"sentence" (GLUE's trailing space stripped), "label"};
    google/boolq {"question", "answer", "passage"} -> the same keys; openai/gsm8k is already local format.
    """
    if name == "sst2":
        return {"sentence": row["sentence"].strip(), "label": int(row["label"])}
    if name == "boolq":
        return {
            "question": row["question"],
            "passage": row["passage"],
            "answer": bool(row["answer"]),
            "title": row.get("title", ""),
        }
    if name == "gsm8k":
        return {"question": row["question"], "answer": row["answer"]}
    raise ValueError(f"no hub mapping for task {name!r}")


def _boolq_derived_split(records: list[Record], eval_size: int, split: Split, seed: int, source: str) -> list[Record]:
    """A seeded permutation of BoolQ dev: the first `eval_size` are eval, the rest train (disjoint)."""
    if eval_size >= len(records):
        raise DataError(
            f"task.boolq_eval_size = {eval_size} leaves no BoolQ training examples ({source} has {len(records)}): "
            f"lower task.boolq_eval_size"
        )
    order = _rng(seed, _STREAM_BOOLQ_SPLIT).permutation(len(records))
    chosen = order[:eval_size] if split == "eval" else order[eval_size:]
    return [records[i] for i in sorted(chosen)]


def _user_records(task: TaskSpec, split: Split, spec_dir: Path | None) -> tuple[list[Record], str]:
    """Records of the jsonl task's own file (JSON lines, CSV or Parquet)."""
    key = "task.train_file" if split == "train" else "task.eval_file"
    raw = task.train_file if split == "train" else task.eval_file
    if not raw:
        raise DataError(f"task.name = 'jsonl' needs {key}: set it to a JSONL, CSV or Parquet file")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = (spec_dir if spec_dir is not None else Path.cwd()) / path
    if not path.is_file():
        raise DataError(f"{key} = {raw!r}: file {path} not found; fix {key} (a relative path is relative to the spec's folder)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        records = read_jsonl(path)
    elif suffix in (".csv", ".parquet"):
        records = _table_records(path, suffix[1:], key)
    else:
        raise DataError(f"{key} = {raw!r}: unknown file type {suffix!r}; use .jsonl, .csv or .parquet")
    _require_nonempty(records, str(path))
    return records, str(path)


def _table_records(path: Path, fmt: str, key: str) -> list[Record]:
    """Rows of a CSV or Parquet file, read through `datasets`."""
    import datasets  # imported lazily: slow, and only needed for these formats

    try:
        rows = datasets.load_dataset(fmt, data_files=str(path), split="train", **_table_options(path, fmt))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{key}: could not read {path} as {fmt.upper()} ({type(exc).__name__}: {exc}); fix the file") from None
    # CSV data row i sits on file line i + 2 (line 1 is the header); Parquet has rows, not lines.
    where = (lambda i: f"{path}:{i + 2}") if fmt == "csv" else (lambda i: f"{path} row {i}")
    return [Record(where(i), i, dict(row)) for i, row in enumerate(rows)]


def _table_options(path: Path, fmt: str) -> dict[str, Any]:
    """CSV: every column read as text, as written ("007" stays "007", "NA" stays "NA")."""
    if fmt != "csv":
        return {}
    import csv

    import datasets

    with open(path, encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh), [])
    if not header:
        raise DataError(f"{path} has no header line; put the column names (e.g. input,output) on line 1")
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}), "keep_default_na": False}


def _require_nonempty(records: list[Record], source: str) -> None:
    if not records:
        raise DataError(f"{source} has no records; fill it (one JSON object per line) or point the spec at a non-empty file")


# ---- records -> examples -----------------------------------------------------------------------


def _builtin_examples(task: TaskSpec, records: list[Record], source: str, split: Split) -> list[Example]:
    spec = BUILTIN[task.name]
    template = prompt_template(task)
    needed = {f: "" for f in spec.required} | {
        f: " (used by task.prompt)" for f in template_fields(template, records[0].fields, source)
    }
    stem = Path(spec.files[split]).stem  # "train", "dev", "test": same ids whether local or hub
    examples = []
    for rec in records:
        _check_fields(rec, needed)
        label, answer = _target(task.name, rec)
        choices = list(spec.choices) if spec.choices else None
        examples.append(Example(f"{task.name}-{stem}-{rec.index}", _render(template, rec), answer, label, choices))
    return examples


def _target(name: str, rec: Record) -> tuple[int | None, str]:
    """(label, answer text) of a built-in task record."""
    choices = BUILTIN[name].choices
    if name == "sst2":
        label = rec.fields["label"]
        if isinstance(label, bool) or label not in (0, 1):
            raise DataError(f"{rec.where}: 'label' is {label!r}; SST-2 labels must be 0 (negative) or 1 (positive)")
        assert choices is not None  # a classification task
        return int(label), choices[int(label)]
    if name == "boolq":
        answer = rec.fields["answer"]
        if not isinstance(answer, bool):
            raise DataError(f"{rec.where}: 'answer' is {answer!r}; BoolQ answers must be true or false")
        assert choices is not None  # a classification task
        return int(answer), choices[int(answer)]
    solution = rec.fields["answer"]
    if not isinstance(solution, str) or not solution.strip():
        raise DataError(f"{rec.where}: 'answer' must be a non-empty solution text ending in '#### <number>'")
    return None, " " + solution.strip()


def _user_examples(task: TaskSpec, records: list[Record], source: str) -> list[Example]:
    template = prompt_template(task)
    needed = {task.input_field: " (task.input_field)", task.output_field: " (task.output_field)"}
    needed |= {f: " (used by task.prompt)" for f in template_fields(template, records[0].fields, source) if f not in needed}
    stem = Path(source).stem
    choices = [c if c[:1].isspace() else " " + c for c in task.choices] if task.choices else None
    examples = []
    for rec in records:
        _check_fields(rec, needed)
        output = str(rec.fields[task.output_field])
        # The answer follows the prompt directly: a separating space unless the output brings its own.
        answer = output if output[:1].isspace() else " " + output
        label = None
        if choices is not None:
            words = [c.strip() for c in choices]
            if answer.strip() not in words:
                raise DataError(
                    f"{rec.where}: {task.output_field!r} is {output!r}, not one of task.choices {task.choices}; fix the record or task.choices"
                )
            label = words.index(answer.strip())
            answer = choices[label]
        examples.append(Example(f"{stem}-{rec.index}", _render(template, rec), answer, label, choices))
    return examples


def template_fields(template: str, first: dict[str, Any], source: str) -> tuple[str, ...]:
    """The record fields a prompt template uses, checked against the first record's keys.

    Raises DataError naming task.prompt for a malformed template, a positional `{}` or a field
    the records do not have (listing the fields they do have).
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataError(
            f"task.prompt {template!r} is not a valid template ({exc}); write fields as {{name}} and literal braces as {{{{ }}}}"
        ) from None
    names: list[str] = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        base = field.split(".")[0].split("[")[0]
        if not base or base.isdigit():
            raise DataError(f"task.prompt {template!r} has a positional {{{field}}}; name a record field inside the braces")
        if base not in first:
            raise DataError(
                f"task.prompt uses {{{base}}}, but the records of {source} have the fields {', '.join(sorted(first))}; fix task.prompt"
            )
        names.append(base)
    return tuple(dict.fromkeys(names))


def _render(template: str, rec: Record) -> str:
    # A format spec, conversion or attribute that fits the record's values only fails here, per record.
    try:
        return template.format(**rec.fields)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise DataError(
            f"{rec.where}: task.prompt {template!r} cannot be filled from this record "
            f"({type(exc).__name__}: {exc}); write fields as plain {{name}}"
        ) from None


def _check_fields(rec: Record, needed: dict[str, str]) -> None:
    """DataError at the record's file:line when a needed field is absent, null or blank text."""
    for field, why in needed.items():
        value = rec.fields.get(field)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(
                f"{rec.where}: record has no (or an empty) field {field!r}{why}; fill it in every record or fix the spec"
            )


# ---- limits ------------------------------------------------------------------------------------


def _limit(examples: list[Example], limit: int, seed: int, split: Split) -> list[Example]:
    """All examples when `limit` is 0 or covers them, else a seeded, label-stratified subset."""
    if limit <= 0 or limit >= len(examples):
        if limit > len(examples):
            log.info("task.%s_examples = %d, but only %d exist: using all", split, limit, len(examples))
        return examples
    labels = [e.label for e in examples]
    chosen = stratified_subset(labels, limit, _rng(seed, _STREAM_SUBSET[split]))
    return [examples[i] for i in chosen]


def stratified_subset(labels: list[int | None], k: int, rng: np.random.Generator) -> list[int]:
    """k indices (sorted) drawn without replacement, each label getting its share of k.

    Shares are proportional to the label counts (largest remainder), so a small subset keeps the
    source's label balance; unlabelled data (all None) is one group, i.e. a plain random subset.
    """
    groups: dict[Any, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    keys = sorted(groups, key=lambda g: (g is None, g))
    exact = [k * len(groups[g]) / len(labels) for g in keys]
    quota = [int(x) for x in exact]
    for j in sorted(range(len(keys)), key=lambda j: quota[j] - exact[j])[: k - sum(quota)]:
        quota[j] += 1  # largest remainders first
    chosen: list[int] = []
    for g, q in zip(keys, quota):
        chosen.extend(rng.choice(groups[g], size=q, replace=False).tolist())
    return sorted(chosen)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


def validation_slice(spec, needed_by: str, otherwise: str) -> list[Example]:
    """The task's validation slice: task.val_examples of the training split's unused examples, the
    server's for choosing and watching, never trained on and never the eval split. `needed_by` names
    the key that asked for it (e.g. "federate.eval_every = 2"), `otherwise` how to do without it; an empty
    slice is a SpecError saying both."""
    from fedsoda_cli.data.paths import resolve_data_dir
    from fedsoda_cli.errors import SpecError
    from fedsoda_cli.spec import spec_dir

    folder = spec_dir(spec)
    examples = load_task(spec.task, resolve_data_dir(spec.data, folder), "val", spec.run.seed, spec_dir=folder)
    if not examples:
        raise SpecError(
            f"{needed_by} needs validation examples, but task.train_examples = {spec.task.train_examples} leaves none of "
            f"the training split unused (task.val_examples = {spec.task.val_examples}); lower task.train_examples, "
            f"raise task.val_examples, or {otherwise}"
        )
    return examples
