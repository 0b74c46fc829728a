#!/usr/bin/env bash
# Does the 9-layer gap or its shape limit the transfer? On the SST-2 headline, SGP's three groups of 3
# touch (10..12, 13..15, 16..18: one 9-layer gap with one aligned layer after it). With
# `prune.min_kept_between = 1` each group keeps a layer after it (9..11, 13..15, 17..19 on this profile):
# the same 9 layers removed, three 3-layer gaps, three aligned layers. Both, seed by seed, IID then
# Dirichlet 0.5 (the headline's spec and budgets, nothing else changed), then `fedsoda report` and
# bench/paired_gain.py: each run against zero-shot, and spaced against adjacent on the same seed and
# partition, paired on the same 872 examples. The first run also scores zero-shot.
#
#   bash bench/spaced_groups.sh     about 80 minutes on a quiet 2-core machine (12 runs of 6-7 minutes)
#   PARTITIONS=dirichlet SEEDS="1 2" bash bench/spaced_groups.sh     a part of it (after the IID seed-0
#                                   pair has run: that run holds the profile and zero-shot)
#
# Order: pairs (spaced, adjacent) per seed, IID first, so a run stopped early leaves paired results.
# profile is computed once; a variant's prune, align and quantize are shared by its IID and Dirichlet
# runs of the same seed (they do not depend on the partition), as the headline's Dirichlet runs did.
# Results: runs/spaced-groups-report/report.md and runs/spaced-groups-paired.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
python=${PYTHON:-.venv/bin/python}
runs=()
first=runs/sst2-spaced-iid-seed0
for partition in ${PARTITIONS:-iid dirichlet}; do
  for seed in ${SEEDS:-0 1 2}; do
    for variant in spaced adjacent; do
      f="runs/sst2-$variant-$partition-seed$seed"
      [ "$f" = "$first" ] || reuse "$first" "$f" profile
      [ "$partition" = iid ] || reuse "runs/sst2-$variant-iid-seed$seed" "$f" prune align quantize
      spacing=0; [ "$variant" = spaced ] && spacing=1
      targets='["plugin","sub"]'; [ "$f" = "$first" ] && targets='["plugin","sub","zero-shot"]'
      timed_run "$f" specs/sst2-fedsoda.toml --set "run.seed=$seed" --set "federate.partition=$partition" \
        --set "prune.min_kept_between=$spacing" --set "run.name=sst2-$variant-$partition" --set "eval.targets=$targets"
      runs+=("$f")
    done
    "$python" bench/paired_gain.py --vs "runs/sst2-spaced-$partition-seed$seed" "runs/sst2-adjacent-$partition-seed$seed" \
      | tee -a runs/spaced-groups-paired.txt
  done
done
"$fedsoda" report "${runs[@]}" --out runs/spaced-groups-report
"$python" bench/paired_gain.py "$first/eval/predictions.jsonl" "${runs[@]}" | tee -a runs/spaced-groups-paired.txt
