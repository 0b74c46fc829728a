"""`fedsoda report RUN_DIR... --out DIR`: the paper-style comparison of finished runs.

In: run workdirs. From each it reads `spec.json` (method, model, task, name; written there by every
run), every stage's manifest.json (wall time per stage), `federate/summary.json` and
`federate/metrics.jsonl` (communication by kind and per round, per-round accuracy when recorded)
and `eval/results.json` (accuracy of the plugin, sub and zero-shot targets).
Out (in DIR): report.md (main table, change vs FedPETuning, wall time per stage, plots),
report.csv (one row per run), communication_per_round.png and, when some run recorded accuracy
per round, accuracy_per_round.png.

Change vs FedPETuning: each run is compared with the `fedpetuning` run of the same model and task
(the first one given). Communication and storage as a signed relative change in % (the paper's
-70.6 % and -75.6 %), accuracy as the difference in percentage points of the plugin target.
Communication includes each client's one-time model download (METHOD.md, "What is counted").
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsoda_cli import artifacts
from fedsoda_cli.errors import ArtifactError
from fedsoda_cli.reporting import format_bytes


BASELINE = "fedpetuning"
KINDS = ("model", "adapter_down", "adapter_up", "realign")  # as in fedsoda_cli.federated.accounting
STAGE_ORDER = ("profile", "prune", "align", "quantize", "federate", "eval")
TARGETS = ("plugin", "sub", "zero-shot")
ROUND_KINDS = {"adapter_down": "bytes_down", "adapter_up": "bytes_up", "realign": "bytes_realign"}
ACCURACY_PNG = "accuracy_per_round.png"
COMMUNICATION_PNG = "communication_per_round.png"


@dataclass
class RunSummary:
    """What the report needs of one run; None where the run did not produce it."""

    name: str
    workdir: Path
    method: str
    model: str
    task: str
    accuracy: dict[str, float] = field(default_factory=dict)  # target -> accuracy in [0, 1]
    ci95: dict[str, list[float]] = field(default_factory=dict)
    perplexity: dict[str, float] = field(default_factory=dict)
    communication: dict[str, int] = field(default_factory=dict)  # kind -> bytes
    client_storage_bytes: int | None = None
    wall_time_s: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    rounds: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl lines

    @property
    def communication_total(self) -> int | None:
        return sum(self.communication.values()) if self.communication else None

    def cumulative_communication(self) -> list[tuple[int, int]]:
        """(round, bytes so far) from round 0 (the model downloads) through every logged round."""
        total = self.communication.get("model", 0)
        points = [(0, total)]
        for record in self.rounds:
            total += sum(int(record.get(key, 0) or 0) for key in ROUND_KINDS.values())
            points.append((int(record["round"]), total))
        return points


def read_run(workdir: Path) -> RunSummary:
    """The RunSummary of a run workdir; ArtifactError when it holds no finished stage."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ArtifactError(f"{workdir}: no such run folder; pass the run's workdir (run.workdir, e.g. runs/<name>)")
    manifests = {name: m for name in _stage_names(workdir) if (m := artifacts.read_manifest(workdir, name)) is not None}
    if not manifests:
        raise ArtifactError(f"{workdir}: no finished stage (no */manifest.json); run `fedsoda run SPEC` first or pass another folder")
    identity = _identity(workdir)
    run = RunSummary(name=identity["name"], workdir=workdir, method=identity["method"], model=identity["model"], task=identity["task"])
    run.wall_time_s = {name: m.wall_time_s for name, m in manifests.items()}
    _read_eval(run, workdir / "eval" / "results.json")
    _read_federate(run, workdir / "federate", manifests)
    run.client_storage_bytes = _client_storage(workdir, manifests)
    return run


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
    """The first fedpetuning run of the same model and task (None for a baseline run itself)."""
    if run.method == BASELINE:
        return None
    for other in runs:
        if other.method == BASELINE and other.model == run.model and other.task == run.task:
            return other
    return None


def write_report(workdirs: list[Path], out_dir: Path) -> list[Path]:
    """Read every run, write report.md, report.csv and the plots into `out_dir`; return the files."""
    if not workdirs:
        raise ArtifactError("fedsoda report needs at least one run folder")
    runs = [read_run(Path(w)) for w in workdirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [_write_csv(runs, out_dir / "report.csv")]
    plots = _plot_communication(runs, out_dir / COMMUNICATION_PNG)
    if any(_accuracy_rounds(r) for r in runs):
        plots += _plot_accuracy(runs, out_dir / ACCURACY_PNG)
    (out_dir / "report.md").write_text(render_markdown(runs, [p.name for p in plots]))
    return [out_dir / "report.md", *files, *plots]


# ---- reading --------------------------------------------------------------------------------------


def _stage_names(workdir: Path) -> list[str]:
    """Stage folders of the workdir, pipeline stages first in order, then any other (e.g. realign)."""
    found = {p.name for p in workdir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / artifacts.MANIFEST).is_file()}
    return [s for s in STAGE_ORDER if s in found] + sorted(found - set(STAGE_ORDER))


def _identity(workdir: Path) -> dict[str, str]:
    """name, method, model, task from the resolved spec that every run keeps in `spec.json`.
    Missing: the folder name and "?"."""
    path = workdir / "spec.json"
    if not path.is_file():
        return {"name": workdir.name, "method": "?", "model": "?", "task": "?"}
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc}); rerun any stage of that run to rewrite it") from None
    model = spec.get("model", {})
    model_name = model.get("path") or model.get("hub_id") or model.get("name") or "?"
    return {"name": str(spec.get("run", {}).get("name", workdir.name)), "method": str(spec.get("run", {}).get("method", "?")),
            "model": str(model_name), "task": str(spec.get("task", {}).get("name", "?"))}


def _read_eval(run: RunSummary, path: Path) -> None:
    if not path.is_file():
        return
    results = _json(path)
    for target, entry in results.items():
        if isinstance(entry, dict) and "accuracy" in entry:
            run.accuracy[target] = float(entry["accuracy"])
            run.ci95[target] = list(entry.get("ci95", []))
            if entry.get("perplexity") is not None:
                run.perplexity[target] = float(entry["perplexity"])
            if run.task == "?":
                run.task = str(entry.get("task", "?"))


def _read_federate(run: RunSummary, folder: Path, manifests: dict) -> None:
    """Communication totals by kind (summary.json, else summed from metrics.jsonl) and the rounds."""
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        run.rounds = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary = _json(folder / "summary.json") if (folder / "summary.json").is_file() else {}
    totals = _kind_totals(summary) or _kind_totals(getattr(manifests.get("federate"), "metrics", {}) or {})
    if totals is None and run.rounds:
        totals = {kind: sum(int(r.get(key, 0) or 0) for r in run.rounds) for kind, key in ROUND_KINDS.items()}
    run.communication = totals or {}
    storage = summary.get("client_storage_bytes")
    if storage is not None:
        run.client_storage_bytes = int(storage)


def _kind_totals(data: dict) -> dict[str, int] | None:
    """Bytes by kind from a summary: {"bytes": {kind: n}} (federate's summary.json), {"totals": ...}
    (the ledger's state), possibly nested under "communication" or "ledger", or the kinds as keys."""
    for candidate in (data.get("bytes"), data, data.get("communication"), data.get("ledger")):
        if not isinstance(candidate, dict):
            continue
        totals = candidate.get("totals") if isinstance(candidate.get("totals"), dict) else candidate
        if any(kind in totals for kind in KINDS):
            return {kind: int(totals.get(kind, 0) or 0) for kind in KINDS}
    return None


def _client_storage(workdir: Path, manifests: dict) -> int | None:
    """Bytes a client keeps on disk to train: summary.json's `client_storage_bytes` when the run
    recorded it, else the client model files (quantize/model/) plus the adapter (federate/adapter/),
    as listed in the manifests."""
    summary = workdir / "federate" / "summary.json"
    if summary.is_file() and _json(summary).get("client_storage_bytes") is not None:
        return int(_json(summary)["client_storage_bytes"])
    model = _listed_bytes(manifests.get("quantize"), "model/")
    if model is None:
        return None
    return model + (_listed_bytes(manifests.get("federate"), "adapter/") or 0)


def _listed_bytes(manifest, prefix: str) -> int | None:
    if manifest is None:
        return None
    sizes = [info["bytes"] for rel, info in manifest.outputs.items() if rel.startswith(prefix)]
    return sum(sizes) if sizes else None


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: corrupt JSON ({exc}); rerun the stage that wrote it") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object; rerun the stage that wrote it")
    return data


def _accuracy_rounds(run: RunSummary) -> list[tuple[int, float]]:
    return [(int(r["round"]), float(r["accuracy"])) for r in run.rounds if r.get("accuracy") is not None]


# ---- writing --------------------------------------------------------------------------------------

CSV_FIELDS = ["run", "method", "model", "task", "workdir",
              *(f"accuracy_{t}" for t in TARGETS), *(f"perplexity_{t}" for t in TARGETS),
              "communication_bytes", *(f"communication_{k}_bytes" for k in KINDS), "client_storage_bytes",
              *(f"wall_time_{s}_s" for s in STAGE_ORDER), "wall_time_total_s", "baseline",
              "communication_pct", "communication_rounds_pct", "storage_pct", "accuracy_plugin_pts", "accuracy_sub_pts"]


def _write_csv(runs: list[RunSummary], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for run in runs:
            base = baseline_for(run, runs)
            row = {"run": run.name, "method": run.method, "model": run.model, "task": run.task, "workdir": str(run.workdir),
                   "communication_bytes": run.communication_total, "client_storage_bytes": run.client_storage_bytes,
                   "wall_time_total_s": round(sum(run.wall_time_s.values()), 3), "baseline": base.name if base else ""}
            row.update({f"accuracy_{t}": run.accuracy.get(t) for t in TARGETS})
            row.update({f"perplexity_{t}": run.perplexity.get(t) for t in TARGETS})
            row.update({f"communication_{k}_bytes": run.communication.get(k) for k in KINDS})
            row.update({f"wall_time_{s}_s": run.wall_time_s.get(s) for s in STAGE_ORDER})
            if base:
                row.update(change_vs(run, base))
            writer.writerow(row)
    return path


def render_markdown(runs: list[RunSummary], plots: list[str]) -> str:
    """report.md: main table, change vs FedPETuning, communication by kind, wall time, plots."""
    lines = ["# fedsoda report", "",
             "Accuracy: task metric of each target on the eval split, with its 95 % Wilson interval. "
             "Communication: every byte between server and clients, the one-time model download included. "
             "Storage: what a client keeps on disk to train (client model + adapter).", "",
             "## Main table", "",
             _table(["run", "method", "model", "task", "plugin", "sub", "zero-shot", "communication", "client storage", "wall time"],
                    [[r.name, r.method, r.model, r.task, *(_accuracy(r, t) for t in TARGETS), _bytes(r.communication_total),
                      _bytes(r.client_storage_bytes), _seconds(sum(r.wall_time_s.values()))] for r in runs])]
    compared = [(r, b) for r in runs if (b := baseline_for(r, runs)) is not None]
    lines += ["", "## Change vs FedPETuning", ""]
    if compared:
        lines.append(_table(["run", "baseline", "communication", "communication w/o model download", "client storage", "accuracy plugin", "accuracy sub"],
                            [[r.name, b.name, *_changes(change_vs(r, b))] for r, b in compared]))
    else:
        lines.append("No `fedpetuning` run of the same model and task was given, so no change is computed.")
    lines += ["", "## Communication by kind", "",
              _table(["run", *KINDS, "total"], [[r.name, *(_bytes(r.communication.get(k)) for k in KINDS), _bytes(r.communication_total)] for r in runs]),
              "", "## Wall time per stage", "",
              _table(["run", *STAGE_ORDER, "total"], [[r.name, *(_seconds(r.wall_time_s.get(s)) for s in STAGE_ORDER), _seconds(sum(r.wall_time_s.values()))] for r in runs])]
    perplexities = [r for r in runs if r.perplexity]
    if perplexities:
        lines += ["", "## Held-out perplexity", "", _table(["run", *TARGETS], [[r.name, *(_number(r.perplexity.get(t)) for t in TARGETS)] for r in perplexities])]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name[:-4].replace('_', ' ')}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _accuracy(run: RunSummary, target: str) -> str:
    if target not in run.accuracy:
        return "-"
    ci = run.ci95.get(target)
    interval = f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci and len(ci) == 2 else ""
    return f"{100 * run.accuracy[target]:.1f}{interval}"


def _changes(change: dict[str, float | None]) -> list[str]:
    def pct(v):
        return "-" if v is None else f"{v:+.1f} %"

    def pts(v):
        return "-" if v is None else f"{v:+.1f} pts"

    return [pct(change["communication_pct"]), pct(change["communication_rounds_pct"]), pct(change["storage_pct"]),
            pts(change["accuracy_plugin_pts"]), pts(change["accuracy_sub_pts"])]


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
            ax.plot([p[0] for p in points], [p[1] / 2**20 for p in points], marker="o", label=f"{run.name} ({run.method})")
    ax.set_xlabel("round (0 = one-time model download)")
    ax.set_ylabel("cumulative communication (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("communication per round")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return [path]


def _plot_accuracy(runs: list[RunSummary], path: Path) -> list[Path]:
    figure, ax = _figure()
    for run in runs:
        points = _accuracy_rounds(run)
        if points:
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=f"{run.name} ({run.method})")
    ax.set_xlabel("round")
    ax.set_ylabel("plugin accuracy (%)")
    ax.set_title("accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return [path]
