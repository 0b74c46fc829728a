#!/usr/bin/env bash
# How deep may SGP prune before the adapter stops transferring? fedsoda on the SST-2 headline (IID, the
# headline's budgets) with p = 1, 2, 4 and 3 groups of n = 3 layers removed (3, 6, 12 and 9 of 30),
# seeds 0-2 each, beside the fair control with nothing pruned (fedpetuning with the full model in the same
# NF4, seeds 0-2); then `fedsoda report` (accuracy, communication and client storage per depth, mean ± std
# over the seeds, accuracy_vs_storage.png) and bench/paired_gain.py (each run's plugin target against
# zero-shot on the same 872 examples). The first run also scores zero-shot, the baseline of every row.
#
#   bash bench/prune_depth.sh     about 80 minutes on a quiet 2-core machine (15 runs of 3.5-6 minutes)
#
# Order: depths 3, 6, 12, the control, then 9 (the headline's own depth last: BENCHMARKS.md already has
# it, so a run stopped early loses the least). profile does not depend on the depth and is computed once;
# prune per depth, and copied to that depth's other seeds, as `fedsoda run --seeds` would.
# Results: runs/prune-depth-report/report.md and runs/prune-depth-paired.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
python=${PYTHON:-.venv/bin/python}
runs=()
control() {  # the fair control, seeds 0-2 (its base and quantize do not depend on the seed)
  for seed in 0 1 2; do
    f="sst2-fedpetuning-nf4-seed$seed"
    [ "$seed" = 0 ] || reuse runs/sst2-fedpetuning-nf4-seed0 "runs/$f" base quantize
    timed_run "runs/$f" specs/sst2-fedpetuning-nf4.toml --set "run.seed=$seed" --set "run.name=sst2-fedpetuning-nf4"
    runs+=("runs/$f")
  done
}
for groups in 1 2 4 0 3; do
  if [ "$groups" = 0 ]; then control; continue; fi
  for seed in 0 1 2; do
    f="sst2-prune$((3 * groups))-seed$seed"
    [ "$groups$seed" = 10 ] || reuse runs/sst2-prune3-seed0 "runs/$f" profile
    [ "$seed" = 0 ] || reuse "runs/sst2-prune$((3 * groups))-seed0" "runs/$f" prune
    targets='["plugin","sub"]'; [ "$groups$seed" = 10 ] && targets='["plugin","sub","zero-shot"]'
    timed_run "runs/$f" specs/sst2-fedsoda.toml --set "run.seed=$seed" --set "prune.groups=$groups" \
      --set "run.name=sst2-prune$((3 * groups))" --set "eval.targets=$targets"
    runs+=("runs/$f")
  done
done
"$fedsoda" report "${runs[@]}" --out runs/prune-depth-report
"$python" bench/paired_gain.py runs/sst2-prune3-seed0/eval/predictions.jsonl "${runs[@]}" | tee runs/prune-depth-paired.txt
