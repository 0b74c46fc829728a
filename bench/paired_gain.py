"""Each run's plugin (and sub) accuracy, and the plugin target's paired gain over zero-shot on the same examples.

    python bench/paired_gain.py ZERO_SHOT_PREDICTIONS.jsonl WORKDIR...
    python bench/paired_gain.py --vs WORKDIR_A WORKDIR_B     A's plugin target minus B's, paired

ZERO_SHOT_PREDICTIONS is an eval/predictions.jsonl that holds target "zero-shot" (zero-shot is the full
model untouched, so one run's scoring serves every run on the same eval examples). The gain uses
`evaluation.stats.paired_difference`, the function `fedsoda eval` writes `vs_zero_shot` with.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from fedsoda_cli.evaluation.stats import paired_difference


def target_rows(path: Path, target: str) -> list[dict]:
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [row for row in rows if row["target"] == target]


def main(zero_shot_path: str, *workdirs: str) -> None:
    zero = {row["id"]: row["correct"] for row in target_rows(Path(zero_shot_path), "zero-shot")}
    if not zero:
        sys.exit(f"{zero_shot_path} holds no zero-shot predictions: score zero-shot in that run's eval.targets")
    for folder in map(Path, workdirs):
        results_path = folder / "eval" / "results.json"
        if not results_path.exists():
            print(f"{folder.name}: no eval")
            continue
        results = json.loads(results_path.read_text())
        line = [folder.name]
        for target in ("plugin", "sub"):
            if target in results:
                r = results[target]
                line.append(f"{target} {100 * r['accuracy']:.1f} [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]")
        rows = target_rows(folder / "eval" / "predictions.jsonl", "plugin")  # read once: the gain and the shares
        plugin = {row["id"]: row["correct"] for row in rows}
        ids = sorted(zero)
        if set(ids) != set(plugin):
            line.append("paired: not the same eval examples as the zero-shot run")
        else:
            d = paired_difference([plugin[i] for i in ids], [zero[i] for i in ids])
            line.append(f"paired {100 * d.difference:+.1f} [{100 * d.ci95[0]:+.1f}, {100 * d.ci95[1]:+.1f}] p={d.p_mcnemar:.2g}")
        shares = Counter(row["prediction"] for row in rows)
        line.append("predicted " + ", ".join(f"{label} {n}" for label, n in sorted(shares.items())))
        print(" | ".join(line))


def versus(a: str, b: str) -> None:
    """Run A's plugin target against run B's on the same examples (e.g. one design against another on
    the same seed)."""
    outcomes = [
        {row["id"]: row["correct"] for row in target_rows(Path(w) / "eval" / "predictions.jsonl", "plugin")} for w in (a, b)
    ]
    if set(outcomes[0]) != set(outcomes[1]):
        sys.exit(f"{a} and {b} scored different eval examples")
    ids = sorted(outcomes[0])
    d = paired_difference([outcomes[0][i] for i in ids], [outcomes[1][i] for i in ids])
    print(
        f"{Path(a).name} - {Path(b).name} | plugin {100 * d.difference:+.1f} [{100 * d.ci95[0]:+.1f}, "
        f"{100 * d.ci95[1]:+.1f}] p={d.p_mcnemar:.2g} | {d.only_a} won, {d.only_b} lost"
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--vs":
        versus(sys.argv[2], sys.argv[3])
    elif len(sys.argv) < 3:
        sys.exit(__doc__)
    else:
        main(*sys.argv[1:])
