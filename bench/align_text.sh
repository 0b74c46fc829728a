#!/usr/bin/env bash
# ODA on task prompts (align.text = "task_prompts") on the SST-2 headline (issue 10): fedsoda with the
# headline's spec (9 of 30 layers pruned), IID, seeds 0-2; with DIR=1 also Dirichlet 0.5, seeds 0-2,
# where the default align collapsed on seeds 1 and 2. The default (`public`) runs of the same spec and
# seeds are the headline's (bench/headline.sh); compare them with bench/paired_gain.py.
#
#   bash bench/align_text.sh [FROM]          about 25 minutes on a quiet 2-core machine (3 runs)
#   DIR=1 SEEDS="1 2" bash bench/align_text.sh [FROM]   adds the Dirichlet runs of those seeds
#
# FROM: a finished run of specs/sst2-fedsoda.toml whose profile and prune (seed-free, and the same
# whatever align.text says) are copied instead of recomputed.
# Results: runs/align-text-report/report.md; each run's client model with no adapter:
# python bench/client_zero_shot.py runs/sst2-fedsoda-tp-seed*
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
from=${1:-}
DIRICHLET='--set federate.partition=dirichlet --set federate.dirichlet_alpha=0.5'
runs=()
for seed in ${SEEDS:-0 1 2}; do
  f="sst2-fedsoda-tp-seed$seed"
  [ -z "$from" ] || reuse "$from" "runs/$f" profile prune
  timed_run "runs/$f" specs/sst2-fedsoda.toml --set "run.seed=$seed" --set align.text=task_prompts \
    --set run.name=sst2-fedsoda-tp --set 'eval.targets=["plugin","sub"]'
  runs+=("runs/$f")
done
if [ "${DIR:-0}" = 1 ]; then
  for seed in ${SEEDS:-0 1 2}; do
    f="sst2-fedsoda-tp-dir05-seed$seed"
    reuse "runs/sst2-fedsoda-tp-seed$seed" "runs/$f" profile prune align quantize
    # shellcheck disable=SC2086
    timed_run "runs/$f" specs/sst2-fedsoda.toml --set "run.seed=$seed" --set align.text=task_prompts $DIRICHLET \
      --set run.name=sst2-fedsoda-tp-dir05 --set 'eval.targets=["plugin","sub"]'
    runs+=("runs/$f")
  done
fi
"$fedsoda" report "${runs[@]}" --out runs/align-text-report
