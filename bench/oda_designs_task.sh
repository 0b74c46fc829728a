#!/usr/bin/env bash
# ODA's quantization-aware designs on the task (issue 11: "plugin accuracy no lower than with today's
# align"): fedsoda on the SST-2 headline (IID, 9 of 30 layers pruned, seeds 0-2) with
# align.quant_aware = bf16_partial (the partial layer stays bf16 on clients, its bytes counted) and
# frozen_rest (trained in float against the NF4 rest, then re-quantized). `off` (the default) and `ste`
# are in BENCHMARKS.md's headline section; bench/oda_deployed.py measures the same designs on public text.
#
#   bash bench/oda_designs_task.sh [FROM]   about 40 minutes on a quiet 2-core machine (6 runs)
#   DESIGNS=bf16_partial SEEDS=0 bash bench/oda_designs_task.sh [FROM]   one design, one seed
#
# FROM: a finished run of specs/sst2-fedsoda.toml whose profile and prune (seed-free, and the same for
# every align design) are copied instead of recomputed, e.g. runs/sst2-prune9-seed0 of bench/prune_depth.sh.
# Results: runs/oda-designs-report/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
from=${1:-}
runs=()
for design in ${DESIGNS:-bf16_partial frozen_rest}; do
  for seed in ${SEEDS:-0 1 2}; do
    f="sst2-fedsoda-align-$design-seed$seed"
    [ -z "$from" ] || reuse "$from" "runs/$f" profile prune
    timed_run "runs/$f" specs/sst2-fedsoda.toml --set "run.seed=$seed" --set "align.quant_aware=$design" \
      --set "run.name=sst2-fedsoda-align-$design" --set 'eval.targets=["plugin","sub"]'
    runs+=("runs/$f")
  done
done
"$fedsoda" report "${runs[@]}" --out runs/oda-designs-report
