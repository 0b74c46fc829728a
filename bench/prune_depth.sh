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
fedsoda=${FEDSODA:-.venv/bin/fedsoda}
python=${PYTHON:-.venv/bin/python}
mkdir -p runs
runs=()
control() {  # the fair control, seeds 0-2 (its base and quantize do not depend on the seed)
  for seed in 0 1 2; do
    f="sst2-fedpetuning-nf4-seed$seed"
    [ "$seed" = 0 ] || for stage in base quantize; do
      [ -d "runs/$f/$stage" ] || { mkdir -p "runs/$f"; cp -a "runs/sst2-fedpetuning-nf4-seed0/$stage" "runs/$f/$stage"; }
    done
    echo "== $f ($(date +%T))"
    /usr/bin/time -v "$fedsoda" run specs/sst2-fedpetuning-nf4.toml --set "run.seed=$seed" \
      --set "run.name=sst2-fedpetuning-nf4" --workdir "runs/$f" 2> "runs/$f.time" || { tail -20 "runs/$f.time"; exit 1; }
    runs+=("runs/$f")
  done
}
for groups in 1 2 4 0 3; do
  if [ "$groups" = 0 ]; then control; continue; fi
  for seed in 0 1 2; do
    f="sst2-prune$((3 * groups))-seed$seed"
    mkdir -p "runs/$f"
    [ "$groups$seed" = 10 ] || [ -d "runs/$f/profile" ] || cp -a runs/sst2-prune3-seed0/profile "runs/$f/profile"
    [ "$seed" = 0 ] || [ -d "runs/$f/prune" ] || cp -a "runs/sst2-prune$((3 * groups))-seed0/prune" "runs/$f/prune"
    targets='["plugin","sub"]'; [ "$groups$seed" = 10 ] && targets='["plugin","sub","zero-shot"]'
    echo "== $f ($(date +%T))"
    /usr/bin/time -v "$fedsoda" run specs/sst2-fedsoda.toml --set "run.seed=$seed" --set "prune.groups=$groups" \
      --set "run.name=sst2-prune$((3 * groups))" --set "eval.targets=$targets" --workdir "runs/$f" 2> "runs/$f.time" \
      || { tail -20 "runs/$f.time"; exit 1; }
    runs+=("runs/$f")
  done
done
"$fedsoda" report "${runs[@]}" --out runs/prune-depth-report
"$python" bench/paired_gain.py runs/sst2-prune3-seed0/eval/predictions.jsonl "${runs[@]}" | tee runs/prune-depth-paired.txt
