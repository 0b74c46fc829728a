#!/usr/bin/env bash
# Plugging the adapter in at a scale (eval.plugin_scale = "val") on the SST-2 headline (issue 10):
# fedsoda with the headline's spec (9 of 30 layers pruned), IID and Dirichlet 0.5, seeds 0-2. Each run
# is made once with the method's plug-in (scale 1, the shipped default); a sibling workdir reuses every
# stage up to federate and reruns only eval with plugin_scale = "val", so the two plugin targets score
# the same adapter on the same 872 examples (pair them with bench/paired_gain.py --vs).
# CONTROL=1 adds the fair control (fedpetuning-NF4) on the same seeds and partitions, the same way, so
# that a gain is read against what the same plug-in rule gives the control. A run whose workdir is
# already evaluated (and its sibling) is kept as it is, so the script can be rerun to add runs.
#
#   bash bench/plugin_scale.sh            about 40 minutes on a quiet 2-core machine (6 runs + 6 evals)
#   CONTROL=1 bash bench/plugin_scale.sh  about 70 minutes
#
# Results: runs/plugin-scale-report/report.md; paired: python bench/paired_gain.py --vs A A-val
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
DIRICHLET=(--set federate.partition=dirichlet --set federate.dirichlet_alpha=0.5)
VAL=(--set eval.plugin_scale=val --set 'eval.targets=["plugin"]')
runs=()
# plugin_run SPEC WORKDIR NAME [fedsoda run arguments...]: the run at scale 1, then its "val" sibling
plugin_run() {
  local spec=$1 workdir=$2 name=$3; shift 3
  runs+=("$workdir" "$workdir-val")
  # a pair an earlier invocation finished is kept as it is (and its .time files with it)
  [ ! -f "$workdir/eval/results.json" ] || [ ! -f "$workdir-val/eval/results.json" ] || return 0
  timed_run "$workdir" "$spec" --set "run.name=$name" "$@"
  # shellcheck disable=SC2046
  reuse "$workdir" "$workdir-val" $(cd "$workdir" && ls -d profile prune align base quantize federate 2>/dev/null)
  timed_run "$workdir-val" "$spec" --set "run.name=$name-val" "$@" "${VAL[@]}"
}
for seed in ${SEEDS:-0 1 2}; do
  targets='eval.targets=["plugin","sub"]'
  [ "$seed" != 0 ] || targets='eval.targets=["plugin","sub","zero-shot"]'
  plugin_run specs/sst2-fedsoda.toml "runs/sst2-fedsoda-seed$seed" sst2-fedsoda --set "run.seed=$seed" --set "$targets"
  reuse "runs/sst2-fedsoda-seed$seed" "runs/sst2-fedsoda-dir05-seed$seed" profile prune align quantize
  plugin_run specs/sst2-fedsoda.toml "runs/sst2-fedsoda-dir05-seed$seed" sst2-fedsoda-dir05 --set "run.seed=$seed" \
    "${DIRICHLET[@]}" --set 'eval.targets=["plugin","sub"]'
done
if [ "${CONTROL:-0}" = 1 ]; then
  for seed in ${SEEDS:-0 1 2}; do
    plugin_run specs/sst2-fedpetuning-nf4.toml "runs/sst2-fedpetuning-nf4-seed$seed" sst2-fedpetuning-nf4 \
      --set "run.seed=$seed" --set 'eval.targets=["plugin"]'
    reuse "runs/sst2-fedpetuning-nf4-seed$seed" "runs/sst2-fedpetuning-nf4-dir05-seed$seed" base quantize
    plugin_run specs/sst2-fedpetuning-nf4.toml "runs/sst2-fedpetuning-nf4-dir05-seed$seed" sst2-fedpetuning-nf4-dir05 \
      --set "run.seed=$seed" "${DIRICHLET[@]}" --set 'eval.targets=["plugin"]'
  done
fi
"$fedsoda" report "${runs[@]}" --out runs/plugin-scale-report
