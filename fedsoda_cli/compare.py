"""`fedsoda report RUN_DIR... --out DIR`: the paper-style comparison of finished runs.

In: run workdirs. From each it reads `spec.json` (the resolved spec, written there by every run),
every stage's manifest.json (wall time per stage; the quantize/model/ and federate/adapter/ files
give the client storage), `federate/summary.json` ("bytes": communication by kind),
`federate/metrics.jsonl` (round records, read through `RoundRecord.from_json`: bytes, step time,
worker RSS and, on rounds where the server evaluated, the eval scores) and `eval/results.json` (accuracy of the plugin, sub and zero-shot targets;
for run.method "local" also the minimum and the accuracy of each client).
Out (in DIR): report.md (main table, change vs FedPETuning, across seeds, step time and RSS vs the
fair control, wall time per stage, plots), report.csv (one row per run),
communication_per_round.png and, when some run evaluated during federate, accuracy_per_round.png
and accuracy_vs_communication.png; when some run measured drift (federate.realign_when = "drift"),
drift_per_round.png; when some run has a final plugin accuracy and a client storage,
accuracy_vs_storage.png (one point per seed group, zero-shot as a line).

Runs are labelled by run.name; runs that share a name get their seed ("seed 1") or, when the seeds
do not tell them apart either, their workdir's folder name.

Change vs FedPETuning: each run is compared with the `fedpetuning` run of the same model and task
(the first one given). Communication and storage as a signed relative change in % (the paper's
-70.6 % and -75.6 %), accuracy as the difference in percentage points of the plugin target.
Communication includes each client's one-time model download (docs/method.md, "What is counted").

Across seeds: runs whose spec.json are equal except for run.seed, run.workdir and eval.targets form a group
(`fedsoda run SPEC --seeds 0,1,2` makes one); each accuracy is given as mean ± sample std over n.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsoda_cli import artifacts
from fedsoda_cli.errors import ArtifactError
from fedsoda_cli.evaluation.targets import TARGETS
from fedsoda_cli.federated.accounting import KINDS
from fedsoda_cli.pipeline import PIPELINES
from fedsoda_cli.round_record import RoundRecord, RoundRecordError
from fedsoda_cli.terminal import format_bytes

BASELINE = "fedpetuning"
STAGE_ORDER = tuple(stage.name for stage in PIPELINES["fedsoda"])  # the wall-time columns, in pipeline order
ACCURACY_PNG = "accuracy_per_round.png"
ACCURACY_BYTES_PNG = "accuracy_vs_communication.png"
COMMUNICATION_PNG = "communication_per_round.png"
DRIFT_PNG = "drift_per_round.png"
STORAGE_PNG = "accuracy_vs_storage.png"
CONTROL_QUANT = "nf4"  # fedpetuning on the NF4 full model: the control that saves by quantizing alone
# What may differ between the runs of one seed group. eval.targets only says which targets eval
# scored, not how anything was trained: a seed run that also scored zero-shot is the same configuration
# (each cell says over how many runs its mean is).
SEED_FREE_KEYS = (("run", "seed"), ("run", "workdir"), ("eval", "targets"))


@dataclass
class RunSummary:
    """What the report needs of one run; None where the run did not produce it."""

    name: str
    workdir: Path
    method: str
    model: str
    task: str
    spec: dict[str, Any] = field(default_factory=dict)  # spec.json ({} when the run kept none)
    label: str = ""  # set by label_runs: the name, told apart from other runs of the same name
    accuracy: dict[str, float] = field(default_factory=dict)  # target -> accuracy in [0, 1] (local: mean over clients)
    ci95: dict[str, list[float]] = field(default_factory=dict)
    min_accuracy: dict[str, float] = field(default_factory=dict)  # local: target -> worst client
    per_client: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # local: target -> [{client, accuracy, ci95}]
    perplexity: dict[str, float] = field(default_factory=dict)
    vs_zero_shot: dict[str, dict[str, Any]] = field(default_factory=dict)  # target -> eval's paired difference
    plugin_scale: float | None = None  # the plug-in scale eval used (eval.plugin_scale); None: written before it existed
    plugin_scale_per_client: bool = False  # run.method local: the clients' adapters were plugged in at different scales
    communication: dict[str, int] = field(default_factory=dict)  # kind -> bytes
    client_storage_bytes: int | None = None
    wall_time_s: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    rounds: list[RoundRecord] = field(default_factory=list)  # metrics.jsonl lines

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    @property
    def seed(self) -> int | None:
        seed = self.spec.get("run", {}).get("seed")
        return None if seed is None else int(seed)

    @property
    def partition(self) -> str | None:
        """How federate split the task data: "iid", or "dirichlet ALPHA" (None: no spec.json)."""
        federate = self.spec.get("federate")
        if not federate:
            return None
        kind = federate.get("partition")
        return f"dirichlet {federate.get('dirichlet_alpha')}" if kind == "dirichlet" else kind

    @property
    def quant_type(self) -> str | None:
        return self.spec.get("quantize", {}).get("quant_type")

    @property
    def step_seconds(self) -> float | None:
        """Mean seconds per client optimizer step, over the rounds that measured it."""
        steps = [r.step_seconds for r in self.rounds if r.step_seconds is not None]
        return statistics.fmean(steps) if steps else None

    @property
    def peak_rss_mb(self) -> float | None:
        """The largest worker RSS of any round."""
        rss = [r.worker_rss_mb for r in self.rounds]
        return max(rss) if rss else None

    def eval_rounds(self) -> dict[str, list[tuple[int, float, int]]]:
        """target -> [(round, accuracy, cumulative bytes after that round)] from the rounds that evaluated."""
        cumulative = dict(self.cumulative_communication())
        curves: dict[str, list[tuple[int, float, int]]] = {}
        for record in self.rounds:
            for target, entry in (record.eval or {}).items():
                curves.setdefault(target, []).append((record.round, entry.accuracy, cumulative[record.round]))
        return curves

    def drift_rounds(self) -> list[tuple[int, float, bool]]:
        """[(round, drift as a multiple of its reference, realigned after it)] from the rounds that measured drift."""
        return [(r.round, r.drift.ratio, bool(r.bytes_realign)) for r in self.rounds if r.drift is not None]

    @property
    def communication_total(self) -> int | None:
        return sum(self.communication.values()) if self.communication else None

    def cumulative_communication(self) -> list[tuple[int, int]]:
        """(round, bytes so far) from round 0 (the model downloads) through every logged round."""
        total = self.communication.get("model", 0)
        points = [(0, total)]
        for record in self.rounds:
            total += record.bytes_down + record.bytes_up + record.bytes_realign
            points.append((record.round, total))
        return points


def read_run(workdir: Path) -> RunSummary:
    """The RunSummary of a run workdir; ArtifactError when it holds no finished stage."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ArtifactError(f"{workdir}: no such run folder; pass the run's workdir (run.workdir, e.g. runs/<name>)")
    manifests = {name: m for name in _stage_names(workdir) if (m := artifacts.read_manifest(workdir, name)) is not None}
    if not manifests:
        raise ArtifactError(
            f"{workdir}: no finished stage (no */manifest.json); run `fedsoda run SPEC` first or pass another folder"
        )
    spec = _spec(workdir)
    identity = _identity(workdir, spec)
    run = RunSummary(
        name=identity["name"],
        workdir=workdir,
        method=identity["method"],
        model=identity["model"],
        task=identity["task"],
        spec=spec,
    )
    run.wall_time_s = {name: m.wall_time_s for name, m in manifests.items()}
    for stage, rel in (("eval", "results.json"), ("federate", "metrics.jsonl"), ("federate", "summary.json")):
        _check_listed(workdir, manifests.get(stage), rel)
    _read_eval(run, workdir / "eval" / "results.json")
    _read_federate(run, workdir / "federate")
    run.client_storage_bytes = _client_storage(manifests)
    return run


def label_runs(runs: list[RunSummary]) -> None:
    """Give every run a distinct label: its name, and where names collide the seed, else the folder."""
    by_name: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(run)
    for name, same in by_name.items():
        if len(same) == 1:
            same[0].label = name
            continue
        seeds = [r.seed for r in same]
        folders = [r.workdir.name for r in same]
        if None not in seeds and len(set(seeds)) == len(seeds):
            labels = [f"{name} seed {seed}" for seed in seeds]
        elif len(set(folders)) == len(folders):
            labels = [f"{name} ({folder})" for folder in folders]
        else:  # same name, seed and folder name (e.g. a/run and b/run): only the position tells them apart
            labels = [f"{name} #{i + 1}" for i in range(len(same))]
        for run, label in zip(same, labels):
            run.label = label


@dataclass
class SeedGroup:
    """Runs of one spec that differ only in run.seed (and run.workdir)."""

    label: str
    runs: list[RunSummary]

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    def accuracy(self, target: str) -> tuple[float, float | None, int] | None:
        """(mean, sample std or None for one run, n) of the target's accuracy over the runs that have it."""
        return _mean_std([r.accuracy[target] for r in self.runs if target in r.accuracy])

    def min_accuracy(self, target: str) -> tuple[float, float | None, int] | None:
        """local runs: (mean, std, n) over the seeds of the worst client's accuracy."""
        return _mean_std([r.min_accuracy[target] for r in self.runs if target in r.min_accuracy])


def seed_groups(runs: list[RunSummary]) -> list[SeedGroup]:
    """Runs grouped by their spec without SEED_FREE_KEYS, in order of first appearance.
    A run without spec.json is a group of its own (nothing says what else it shares)."""
    groups: dict[str, list[RunSummary]] = {}
    for i, run in enumerate(runs):
        key = _seed_free_key(run.spec) if run.spec else f"no-spec-{i}"
        groups.setdefault(key, []).append(run)
    names = [members[0].name for members in groups.values()]
    return [
        SeedGroup(
            members[0].name if names.count(members[0].name) == 1 else f"{members[0].name} ({members[0].workdir.name})", members
        )
        for members in groups.values()
    ]


def step_time_control(runs: list[RunSummary]) -> tuple[RunSummary | None, str]:
    """The run that step time and RSS are divided by, and why it was chosen: the first fedpetuning run
    on the NF4 full model (quantization alone, so the ratio shows what pruning adds), else the first
    fedpetuning run."""
    baselines = [r for r in runs if r.method == BASELINE]
    for run in baselines:
        if run.quant_type == CONTROL_QUANT:
            return run, f"{run.label} (fedpetuning, {CONTROL_QUANT} full model)"
    if baselines:
        run = baselines[0]
        return (
            run,
            f"{run.label} (fedpetuning, quantize.quant_type = {run.quant_type or '?'}: no {CONTROL_QUANT} fedpetuning run was given)",
        )
    return None, ""


def change_vs(run: RunSummary, baseline: RunSummary) -> dict[str, float | None]:
    """Signed changes of `run` against `baseline`: communication / communication without the model
    download / client storage in % of the baseline; plugin and sub accuracy in percentage points
    (each against the same target of the baseline)."""

    def relative(ours, theirs):
        return None if ours is None or not theirs else 100.0 * (ours / theirs - 1.0)

    def points(target):
        ours, theirs = run.accuracy.get(target), baseline.accuracy.get(target)
        return None if ours is None or theirs is None else 100.0 * (ours - theirs)

    def without_model(r):
        return None if not r.communication else sum(v for k, v in r.communication.items() if k != "model")

    return {
        "communication_pct": relative(run.communication_total, baseline.communication_total),
        "communication_rounds_pct": relative(without_model(run), without_model(baseline)),
        "storage_pct": relative(run.client_storage_bytes, baseline.client_storage_bytes),
        "accuracy_plugin_pts": points("plugin"),
        "accuracy_sub_pts": points("sub"),
    }


def baseline_for(run: RunSummary, runs: list[RunSummary]) -> RunSummary | None:
    """The fedpetuning run a run is compared with (None for a baseline run itself): of the same model
    and task, and among those the first of the same partition and seed, else of the same partition,
    else of the same seed, else the first. A 24-run report would otherwise hold every run against one
    control run, whatever its data split."""
    if run.method == BASELINE:
        return None
    candidates = [o for o in runs if o.method == BASELINE and o.model == run.model and o.task == run.task]
    if not candidates:
        return None
    # max keeps the first of equal keys, so among equally good matches the order given wins.
    return max(candidates, key=lambda o: (o.partition == run.partition, o.seed == run.seed))


def write_report(workdirs: list[Path], out_dir: Path) -> list[Path]:
    """Read every run, write report.md, report.csv and the plots into `out_dir`; return the files."""
    if not workdirs:
        raise ArtifactError("fedsoda report needs at least one run folder")
    runs = [read_run(Path(w)) for w in workdirs]
    label_runs(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [_write_csv(runs, out_dir / "report.csv")]
    plots = _plot_communication(runs, out_dir / COMMUNICATION_PNG)
    if any(r.eval_rounds() for r in runs):
        plots += _plot_accuracy(runs, out_dir / ACCURACY_PNG) + _plot_accuracy_vs_bytes(runs, out_dir / ACCURACY_BYTES_PNG)
    if any(r.drift_rounds() for r in runs):
        plots += _plot_drift(runs, out_dir / DRIFT_PNG)
    if storage_points(runs):
        plots += _plot_accuracy_vs_storage(runs, out_dir / STORAGE_PNG)
    (out_dir / "report.md").write_text(render_markdown(runs, [p.name for p in plots]))
    return [out_dir / "report.md", *files, *plots]


# ---- reading --------------------------------------------------------------------------------------


def _stage_names(workdir: Path) -> list[str]:
    """Stage folders of the workdir, pipeline stages first in order, then any other (e.g. realign)."""
    found = {
        p.name for p in workdir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / artifacts.MANIFEST).is_file()
    }
    return [s for s in STAGE_ORDER if s in found] + sorted(found - set(STAGE_ORDER))


def _spec(workdir: Path) -> dict[str, Any]:
    """The resolved spec that every run keeps in `spec.json`; {} when the folder has none."""
    path = workdir / "spec.json"
    if not path.is_file():
        return {}
    rebuild = "rerun any stage of that run to rewrite it (fedsoda run SPEC)"
    spec = _load_json(path, rebuild)
    bad = next((k for k, v in spec.items() if k != "plugins" and not isinstance(v, dict)), None)
    seed = spec.get("run", {}).get("seed")
    if bad is not None or (seed is not None and (not isinstance(seed, int) or isinstance(seed, bool))):
        what = f"'{bad}' is not a section" if bad is not None else "run.seed is not an integer"
        raise ArtifactError(f"{path}: not a spec fedsoda wrote ({what}); {rebuild}")
    return spec


def _identity(workdir: Path, spec: dict[str, Any]) -> dict[str, str]:
    """name, method, model, task from the spec. Missing: the folder name and "?"."""
    if not spec:
        return {"name": workdir.name, "method": "?", "model": "?", "task": "?"}
    model = spec.get("model", {})
    model_name = model.get("path") or model.get("hub_id") or model.get("name") or "?"
    return {
        "name": str(spec.get("run", {}).get("name", workdir.name)),
        "method": str(spec.get("run", {}).get("method", "?")),
        "model": str(model_name),
        "task": str(spec.get("task", {}).get("name", "?")),
    }


def _seed_free_key(spec: dict[str, Any]) -> str:
    spec = json.loads(json.dumps(spec))  # a deep copy
    for section, key in SEED_FREE_KEYS:
        spec.get(section, {}).pop(key, None)
    return json.dumps(spec, sort_keys=True)


def _check_listed(workdir: Path, manifest, rel: str) -> None:
    """A file the report reads, against the sha256 its stage's manifest records: a changed byte in a
    number would otherwise go into the report as a result."""
    if manifest is None or rel not in manifest.outputs:
        return
    path = artifacts.stage_dir(workdir, manifest.stage) / rel
    if not path.is_file() or artifacts.sha256_file(path) != manifest.outputs[rel]["sha256"]:
        state = "missing" if not path.is_file() else "modified or corrupt"
        raise ArtifactError(
            f"{path}: content no longer matches the '{manifest.stage}' manifest ({state}); "
            f"rerun `fedsoda {manifest.stage} SPEC --force`"
        )


def _read_eval(run: RunSummary, path: Path) -> None:
    if not path.is_file():
        return
    results = _load_json(path, _EVAL_REBUILD)
    try:
        _read_results(run, results)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ArtifactError(
            f"{path}: not the results fedsoda wrote ({type(exc).__name__}: {str(exc)[:120]}); {_EVAL_REBUILD}"
        ) from None


_EVAL_REBUILD = "rerun `fedsoda eval SPEC --force`"
_FEDERATE_REBUILD = "rerun `fedsoda federate SPEC --force`"


def _read_results(run: RunSummary, results: dict) -> None:
    for target, entry in results.items():
        if isinstance(entry, dict) and "accuracy" in entry:
            run.accuracy[target] = float(entry["accuracy"])
            run.ci95[target] = [float(x) for x in entry.get("ci95", [])]
            if entry.get("min_accuracy") is not None:
                run.min_accuracy[target] = float(entry["min_accuracy"])
            if entry.get("per_client"):
                run.per_client[target] = [_per_client(c) for c in entry["per_client"]]
            if entry.get("perplexity") is not None:
                run.perplexity[target] = float(entry["perplexity"])
            if target == "plugin" and entry.get("plugin_scale"):
                scale = entry["plugin_scale"]["scale"]  # None: run.method local chose one per client
                run.plugin_scale = None if scale is None else float(scale)
                run.plugin_scale_per_client = scale is None
            if entry.get("vs_zero_shot") is not None:
                paired = entry["vs_zero_shot"]
                run.vs_zero_shot[target] = {
                    "difference": float(paired["difference"]),
                    "ci95": [float(x) for x in paired["ci95"]],
                    "p_mcnemar": float(paired["p_mcnemar"]),
                    "only_a": int(paired["only_a"]),
                    "only_b": int(paired["only_b"]),
                }
            if run.task == "?":
                run.task = str(entry.get("task", "?"))


def _read_federate(run: RunSummary, folder: Path) -> None:
    """The rounds (metrics.jsonl) and the communication totals by kind (summary.json's "bytes")."""
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        run.rounds = [
            _round_record(line, f"{metrics}:{number}")
            for number, line in enumerate(metrics.read_bytes().split(b"\n"), start=1)
            if line.strip()
        ]
    if (folder / "summary.json").is_file():
        path = folder / "summary.json"
        totals = _load_json(path, _FEDERATE_REBUILD).get("bytes") or {}
        try:
            run.communication = {kind: int(totals.get(kind, 0) or 0) for kind in KINDS}
        except (TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(
                f"{path}: 'bytes' is not the byte counts fedsoda wrote ({type(exc).__name__}); {_FEDERATE_REBUILD}"
            ) from None


def _round_record(line: bytes, where: str) -> RoundRecord:
    """One metrics.jsonl line, checked field by field (RoundRecord.from_json), so a damaged line is
    named here, with its file and line number, rather than failing later inside a table or a plot."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{where}: corrupt metrics line ({type(exc).__name__}); {_FEDERATE_REBUILD}") from None
    try:
        return RoundRecord.from_json(data)
    except RoundRecordError as exc:
        raise ArtifactError(f"{where}: not a round record fedsoda wrote ({str(exc)[:160]}); {_FEDERATE_REBUILD}") from None


def _per_client(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise TypeError(f"a per-client entry is a JSON {type(entry).__name__}")
    return {**entry, "accuracy": float(entry["accuracy"])}


def _client_storage(manifests: dict) -> int | None:
    """Bytes a client keeps on disk to train: the client model files (quantize/model/) plus the
    adapter (federate/adapter/), as listed in the manifests."""
    model = _listed_bytes(manifests.get("quantize"), "model/")
    if model is None:
        return None
    return model + (_listed_bytes(manifests.get("federate"), "adapter/") or 0)


def _listed_bytes(manifest, prefix: str) -> int | None:
    if manifest is None:
        return None
    sizes = [info["bytes"] for rel, info in manifest.outputs.items() if rel.startswith(prefix)]
    return sum(sizes) if sizes else None


def _load_json(path: Path, rebuild: str) -> dict:
    """A JSON object from a file fedsoda wrote; ArtifactError naming the file and `rebuild` otherwise."""
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested past the parser's stack
        raise ArtifactError(f"{path}: corrupt JSON ({type(exc).__name__}: {str(exc)[:120]}); {rebuild}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object, found a JSON {type(data).__name__}; {rebuild}")
    return data


def _mean_std(values: list[float]) -> tuple[float, float | None, int] | None:
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


# ---- writing --------------------------------------------------------------------------------------

CSV_FIELDS = [
    "run",
    "label",
    "method",
    "model",
    "task",
    "seed",
    "workdir",
    *(f"accuracy_{t}" for t in TARGETS),
    *(f"min_accuracy_{t}" for t in TARGETS),
    *(f"perplexity_{t}" for t in TARGETS),
    "plugin_scale",
    "communication_bytes",
    *(f"communication_{k}_bytes" for k in KINDS),
    "client_storage_bytes",
    "step_seconds",
    "peak_worker_rss_mb",
    *(f"wall_time_{s}_s" for s in STAGE_ORDER),
    "wall_time_total_s",
    "baseline",
    "communication_pct",
    "communication_rounds_pct",
    "storage_pct",
    "accuracy_plugin_pts",
    "accuracy_sub_pts",
]


def _write_csv(runs: list[RunSummary], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for run in runs:
            base = baseline_for(run, runs)
            row = {
                "run": run.name,
                "label": run.label,
                "method": run.method,
                "model": run.model,
                "task": run.task,
                "seed": run.seed,
                "workdir": str(run.workdir),
                "communication_bytes": run.communication_total,
                "client_storage_bytes": run.client_storage_bytes,
                "step_seconds": run.step_seconds,
                "peak_worker_rss_mb": run.peak_rss_mb,
                "wall_time_total_s": round(sum(run.wall_time_s.values()), 3),
                "baseline": base.label if base else "",
                "plugin_scale": "per client" if run.plugin_scale_per_client else run.plugin_scale,
            }
            row.update({f"accuracy_{t}": run.accuracy.get(t) for t in TARGETS})
            row.update({f"min_accuracy_{t}": run.min_accuracy.get(t) for t in TARGETS})
            row.update({f"perplexity_{t}": run.perplexity.get(t) for t in TARGETS})
            row.update({f"communication_{k}_bytes": run.communication.get(k) for k in KINDS})
            row.update({f"wall_time_{s}_s": run.wall_time_s.get(s) for s in STAGE_ORDER})
            if base:
                row.update(change_vs(run, base))
            writer.writerow(row)
    return path


def render_markdown(runs: list[RunSummary], plots: list[str]) -> str:
    """report.md: main table, change vs FedPETuning, across seeds, step time and RSS, communication
    by kind, wall time, plots. Expects labelled runs (label_runs)."""
    lines = [
        "# fedsoda report",
        "",
        "Accuracy: task metric of each target on the eval split, with its 95 % Wilson interval "
        "(run.method local: the mean over clients, the worst client in parentheses). "
        "Communication: every byte between server and clients, the one-time model download included. "
        "Storage: what a client keeps on disk to train (client model + adapter).",
        "",
        "## Main table",
        "",
        _table(
            ["run", "method", "model", "task", "plugin", "sub", "zero-shot", "communication", "client storage", "wall time"],
            [
                [
                    r.label,
                    r.method,
                    r.model,
                    r.task,
                    *(_accuracy(r, t) for t in TARGETS),
                    _bytes(r.communication_total),
                    _bytes(r.client_storage_bytes),
                    _seconds(sum(r.wall_time_s.values())),
                ]
                for r in runs
            ],
        ),
    ]
    compared = [(r, b) for r in runs if (b := baseline_for(r, runs)) is not None]
    lines += ["", "## Change vs FedPETuning", ""]
    if compared:
        lines += [
            "Each run against the `fedpetuning` run of the same model and task, and of the same partition and "
            "seed where one was given (else the same partition, else the same seed, else the first).",
            "",
        ]
        lines.append(
            _table(
                [
                    "run",
                    "baseline",
                    "communication",
                    "communication w/o model download",
                    "client storage",
                    "accuracy plugin",
                    "accuracy sub",
                ],
                [[r.label, b.label, *_changes(change_vs(r, b))] for r, b in compared],
            )
        )
    else:
        lines.append("No `fedpetuning` run of the same model and task was given, so no change is computed.")
    lines += _against_zero_shot(runs)
    lines += _across_seeds(runs)
    lines += _step_time(runs)
    lines += [
        "",
        "## Communication by kind",
        "",
        _table(
            ["run", *KINDS, "total"],
            [[r.label, *(_bytes(r.communication.get(k)) for k in KINDS), _bytes(r.communication_total)] for r in runs],
        ),
        "",
        "## Wall time per stage",
        "",
        _table(
            ["run", *STAGE_ORDER, "total"],
            [
                [r.label, *(_seconds(r.wall_time_s.get(s)) for s in STAGE_ORDER), _seconds(sum(r.wall_time_s.values()))]
                for r in runs
            ],
        ),
    ]
    perplexities = [r for r in runs if r.perplexity]
    if perplexities:
        lines += [
            "",
            "## Held-out perplexity",
            "",
            _table(["run", *TARGETS], [[r.label, *(_number(r.perplexity.get(t)) for t in TARGETS)] for r in perplexities]),
        ]
    if plots:
        lines += ["", "## Plots"]
        for name in plots:  # a paragraph each, so every image sits on its own line
            lines += ["", _image(name)]
    return "\n".join(lines) + "\n"


def _against_zero_shot(runs: list[RunSummary]) -> list[str]:
    """Each trained target minus zero-shot on the same examples (eval's paired difference): two
    targets scored on one eval set are correlated, so their separate intervals' overlap says little."""
    rows = [
        [
            r.label,
            target,
            f"{100 * p['difference']:+.1f}",
            f"[{100 * p['ci95'][0]:+.1f}, {100 * p['ci95'][1]:+.1f}]",
            f"{p['p_mcnemar']:.2g}",
            f"{p['only_a']} / {p['only_b']}",
        ]
        for r in runs
        for target, p in r.vs_zero_shot.items()
    ]
    if not rows:
        return []
    return [
        "",
        "## Against zero-shot, paired on the same examples",
        "",
        "Points of accuracy over the untrained full model on the same eval examples: Newcombe's interval for paired "
        "proportions and the exact McNemar test (won / lost: examples only this target / only zero-shot got right).",
        "",
        _table(["run", "target", "gain (points)", "paired 95 % CI", "McNemar p", "won / lost"], rows),
    ]


def _image(file_name: str) -> str:
    """A markdown image that renders: `![alt](file)` with a non-empty alt text."""
    alt = Path(file_name).stem.replace("_", " ")
    return f"![{alt}]({file_name})"


def _across_seeds(runs: list[RunSummary]) -> list[str]:
    """The seed-group table, when some spec was run on more than one seed."""
    groups = seed_groups(runs)
    if all(len(g.runs) < 2 for g in groups):
        return []
    local = any(g.method == "local" for g in groups)
    header = ["group", "method", "seeds", "n", *TARGETS, *(["worst client (local)"] if local else [])]
    rows = []
    for g in groups:
        row = [
            g.label,
            g.method,
            ", ".join("?" if s is None else str(s) for s in g.seeds),
            str(len(g.runs)),
            *(_mean_std_text(g.accuracy(t)) for t in TARGETS),
        ]
        if local:
            worst = [f"{t} {_mean_std_text(m)}" for t in TARGETS if (m := g.min_accuracy(t)) is not None]
            row.append("; ".join(worst) or "-")
        rows.append(row)
    return [
        "",
        "## Across seeds",
        "",
        "Runs whose spec.json are equal except for run.seed, run.workdir and eval.targets (which targets were scored). Accuracy in %: mean ± sample std over n runs "
        "(run.method local: of the mean over clients; the worst client's accuracy in its own column).",
        "",
        _table(header, rows),
    ]


def _step_time(runs: list[RunSummary]) -> list[str]:
    """Client step time and peak worker RSS, as ratios to the fair control."""
    measured = [r for r in runs if r.step_seconds is not None or r.peak_rss_mb is not None]
    if not measured:
        return []
    control, why = step_time_control(runs)
    intro = (
        "Measured in the client workers during federate: mean seconds per optimizer step and the largest RSS of any round. "
        + (f"Ratios to {why}." if control else "No `fedpetuning` run was given, so no ratio is computed.")
    )

    def ratio(ours, theirs):
        return "-" if ours is None or not theirs else f"{ours / theirs:.2f}x"

    rows = [
        [
            r.label,
            r.method,
            r.quant_type or "-",
            "-" if r.step_seconds is None else f"{1000 * r.step_seconds:.1f} ms",
            ratio(r.step_seconds, control.step_seconds if control else None),
            "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f} MB",
            ratio(r.peak_rss_mb, control.peak_rss_mb if control else None),
        ]
        for r in measured
    ]
    return [
        "",
        "## Client step time and peak RSS",
        "",
        intro,
        "",
        _table(["run", "method", "quant_type", "step time", "step time ratio", "peak worker RSS", "RSS ratio"], rows),
    ]


def _mean_std_text(stats: tuple[float, float | None, int] | None) -> str:
    if stats is None:
        return "-"
    mean, std, n = stats
    return f"{100 * mean:.1f} ± {100 * std:.1f} (n={n})" if std is not None else f"{100 * mean:.1f} (n={n})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _accuracy(run: RunSummary, target: str) -> str:
    if target not in run.accuracy:
        return "-"
    ci = run.ci95.get(target)
    interval = f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci and len(ci) == 2 else ""
    worst = f" (min {100 * run.min_accuracy[target]:.1f})" if target in run.min_accuracy else ""
    # a plugin plugged in at another scale than the adapter as trained is another model: say so
    scaled = ""
    if target == "plugin" and run.plugin_scale_per_client:
        scaled = " at s per client"
    elif target == "plugin" and run.plugin_scale not in (None, 1.0):
        scaled = f" at s {run.plugin_scale:g}"
    return f"{100 * run.accuracy[target]:.1f}{interval}{worst}{scaled}"


def _changes(change: dict[str, float | None]) -> list[str]:
    def pct(v):
        return "-" if v is None else f"{v:+.1f} %"

    def pts(v):
        return "-" if v is None else f"{v:+.1f} pts"

    return [
        pct(change["communication_pct"]),
        pct(change["communication_rounds_pct"]),
        pct(change["storage_pct"]),
        pts(change["accuracy_plugin_pts"]),
        pts(change["accuracy_sub_pts"]),
    ]


def _bytes(n: int | None) -> str:
    return "-" if n is None else format_bytes(n)


def _seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.1f} s"


def _number(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


# ---- plots ----------------------------------------------------------------------------------------


def _figure():
    """A matplotlib Figure drawn by the Agg canvas: no pyplot, no display, no global backend change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    return figure, ax


def _plot_communication(runs: list[RunSummary], path: Path) -> list[Path]:
    figure, ax = _figure()
    for run in runs:
        if run.communication or run.rounds:
            points = run.cumulative_communication()
            ax.plot([p[0] for p in points], [p[1] / 2**20 for p in points], marker="o", label=f"{run.label} ({run.method})")
    ax.set_ylim(bottom=0)
    return _save(
        figure, ax, path, "round (0 = one-time model download)", "cumulative communication (MiB)", "communication per round"
    )


@dataclass
class Curve:
    """One seed group's per-round validation accuracy of one target: the mean over its seeds, and
    the lowest and highest seed (a band a reader can trust with 3 seeds, which a std is not)."""

    label: str
    target: str
    seeds: int
    rounds: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    mean_bytes: list[float]  # cumulative communication at each round, mean over the seeds


def accuracy_curves(runs: list[RunSummary]) -> list[Curve]:
    """Per seed group and evaluated target, on the rounds every seed of the group evaluated."""
    curves = []
    for group in seed_groups(runs):
        per_run = [run.eval_rounds() for run in group.runs]
        for target in dict.fromkeys(t for rounds in per_run for t in rounds):
            if not all(target in rounds for rounds in per_run):
                continue
            tables = [{p[0]: (p[1], p[2]) for p in rounds[target]} for rounds in per_run]
            common = sorted(set.intersection(*(set(table) for table in tables)))
            accuracy = [[table[r][0] for table in tables] for r in common]
            curves.append(
                Curve(
                    group.label,
                    target,
                    len(tables),
                    common,
                    [statistics.fmean(values) for values in accuracy],
                    [min(values) for values in accuracy],
                    [max(values) for values in accuracy],
                    [statistics.fmean(table[r][1] for table in tables) for r in common],
                )
            )
    return curves


def _plot_curves(ax, curves: list[Curve], x_of) -> None:
    for i, curve in enumerate(curves):
        x = x_of(curve)
        style = "-" if i < 10 else "--"  # matplotlib's colour cycle has ten colours
        label = f"{curve.label} {curve.target}" + (
            f" (mean of {curve.seeds} seeds, band: lowest-highest)" if curve.seeds > 1 else ""
        )
        (line,) = ax.plot(x, [100 * v for v in curve.mean], marker="o", linestyle=style, label=label)
        if curve.seeds > 1:
            ax.fill_between(x, [100 * v for v in curve.low], [100 * v for v in curve.high], color=line.get_color(), alpha=0.15)


def _plot_accuracy(runs: list[RunSummary], path: Path) -> list[Path]:
    """One line per seed group and evaluated target, e.g. "quickstart sub (mean of 3 seeds)"."""
    figure, ax = _figure()
    _plot_curves(ax, accuracy_curves(runs), lambda c: c.rounds)
    return _save(figure, ax, path, "round", "accuracy on the validation slice (%)", "accuracy per round")


def _plot_accuracy_vs_bytes(runs: list[RunSummary], path: Path) -> list[Path]:
    """Accuracy against the bytes spent to reach it: the model download plus every round so far."""
    figure, ax = _figure()
    ax.xaxis.set_major_locator(_auto_locator())
    _plot_curves(ax, accuracy_curves(runs), lambda c: [b / 2**20 for b in c.mean_bytes])
    return _save(
        figure,
        ax,
        path,
        "cumulative communication (MiB, model download included)",
        "accuracy on the validation slice (%)",
        "accuracy vs communication",
    )


@dataclass
class StoragePoint:
    """One seed group's final plugin accuracy (the full model with the adapter: what a user gets) against
    what its client keeps on disk to train: the mean over its seeds, and the lowest and highest seed."""

    label: str
    seeds: int
    storage_bytes: float  # mean over the seeds
    mean: float
    low: float
    high: float


def storage_points(runs: list[RunSummary]) -> list[StoragePoint]:
    """Per seed group, over its runs that have both a plugin accuracy and a client storage."""
    points = []
    for group in seed_groups(runs):
        members = [r for r in group.runs if "plugin" in r.accuracy and r.client_storage_bytes is not None]
        if not members:
            continue
        accuracy = [r.accuracy["plugin"] for r in members]
        points.append(
            StoragePoint(
                group.label,
                len(members),
                statistics.fmean(float(r.client_storage_bytes or 0) for r in members),
                statistics.fmean(accuracy),
                min(accuracy),
                max(accuracy),
            )
        )
    return points


def _plot_accuracy_vs_storage(runs: list[RunSummary], path: Path) -> list[Path]:
    """The trade-off a client's owner weighs: final plugin accuracy (bar: lowest-highest seed) against
    client storage, one point per seed group, and zero-shot (per task, the mean of the runs that scored
    it) as a dashed line, the level a trained adapter must beat."""
    figure, ax = _figure()
    ax.xaxis.set_major_locator(_auto_locator())
    for point in storage_points(runs):
        x, y = point.storage_bytes / 2**20, 100 * point.mean
        label = point.label + (f" (mean of {point.seeds} seeds, bar: lowest-highest)" if point.seeds > 1 else "")
        ax.errorbar(
            [x], [y], yerr=[[y - 100 * point.low], [100 * point.high - y]], marker="o", linestyle="none", capsize=3, label=label
        )
    zero_shot: dict[str, list[float]] = {}  # per task: two tasks' zero-shot levels are not one line
    for run in runs:
        if "zero-shot" in run.accuracy:
            zero_shot.setdefault(run.task, []).append(run.accuracy["zero-shot"])
    for task, levels in zero_shot.items():
        label = "zero-shot" + (f" ({task})" if len(zero_shot) > 1 else "")
        ax.axhline(100 * statistics.fmean(levels), color="grey", linestyle="--", linewidth=1, label=label)
    return _save(figure, ax, path, "client storage (MiB: client model + adapter)", "plugin accuracy (%)", "accuracy vs storage")


def _plot_drift(runs: list[RunSummary], path: Path) -> list[Path]:
    """Drift per round as a multiple of the drift right after the last alignment; a filled marker
    where the server realigned, the threshold as a dashed line."""
    figure, ax = _figure()
    for run in runs:
        points = run.drift_rounds()
        if not points:
            continue
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", mfc="none", label=run.label)
        hits = [p for p in points if p[2]]
        ax.plot([p[0] for p in hits], [p[1] for p in hits], "o", color=line.get_color())
        threshold = run.spec.get("federate", {}).get("drift_threshold")
        if threshold:
            ax.axhline(float(threshold), color=line.get_color(), linestyle="--", linewidth=0.8)
    return _save(
        figure, ax, path, "round (filled: realigned after it)", "drift (KL / KL after the last alignment)", "drift per round"
    )


def _save(figure, ax, path: Path, xlabel: str, ylabel: str, title: str) -> list[Path]:
    """Every plot's ending: axis labels, title, grid, a legend when something was drawn, the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(ax.lines) > 6:  # beside the axes, so that no line hides behind it
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    elif ax.lines:
        ax.legend(fontsize="small")
    figure.savefig(path, bbox_inches="tight")
    return [path]


def _auto_locator():
    from matplotlib.ticker import AutoLocator

    return AutoLocator()
