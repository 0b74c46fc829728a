#!/usr/bin/env bash
# The headline benchmark on SST-2 (SmolLM2-135M, full dev set): every method with equal budgets, on
# IID data and on Dirichlet-0.5 label skew, then `fedsoda report` (tables, curves, seeds).
#
#   bash bench/headline.sh          the core set, sized for about 100 minutes on 2 CPU cores:
#                                   zero-shot, central, local, fedsoda and fedpetuning-NF4 (the fair
#                                   control), IID and Dirichlet 0.5, seed 0
#   SEEDS=1 bash bench/headline.sh  adds seeds 1 and 2 of fedsoda and fedpetuning-NF4, IID and
#                                   Dirichlet (about 40 minutes more on a quiet 2-core machine)
#   FULL=1 bash bench/headline.sh   the seeds, plus fedsoda with ODA's quantization-aware align
#                                   (align.quant_aware = "ste", 3 seeds, IID: issue 11's with/without;
#                                   the default is "off"), fedpetuning in bf16 and fedot, IID and
#                                   Dirichlet (about 130 minutes in all, quiet)
#   MOMENTUM=1 bash bench/headline.sh  adds fedsoda under Dirichlet 0.5 with server momentum
#                                   (federate.aggregator = "fedavgm", its shipped options), seeds 0-2,
#                                   beside the same seeds with fedavg: what resists client drift
#
# Runs go in order of what a reader needs first (IID before Dirichlet, the seeds before the extras),
# so a run stopped early still leaves the most important rows.
# Stages that do not depend on the partition (profile, prune, align, quantize; fedpetuning's base)
# are computed once per method and copied into the sibling workdirs, exactly as `fedsoda run --seeds`
# reuses them: their manifests stay valid, so `fedsoda run` finds them up to date.
# Results: runs/sst2-report/report.md; /usr/bin/time -v output of each run in runs/<name>.time.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
DIR='--set federate.partition=dirichlet --set federate.dirichlet_alpha=0.5'

run() {  # run FOLDER SPEC [fedsoda run options...]: runs/FOLDER is the workdir; run.name = FOLDER without -seed<k>,
  local folder=$1; shift  # so the seeds of one configuration share a name and `fedsoda report` groups them
  timed_run "runs/$folder" "$@" --set "run.name=${folder%-seed*}"
}
share() { reuse "runs/$1" "runs/$2" "${@:3}"; }  # share FROM TO STAGE...: reuse between folders of runs/

SEED_LIST=(0)
if [ "${FULL:-0}" = 1 ] || [ "${SEEDS:-0}" = 1 ] || [ "${MOMENTUM:-0}" = 1 ]; then SEED_LIST=(0 1 2); fi
runs=()
folder() { [ "$2" = 0 ] && echo "$1" || echo "$1-seed$2"; }  # folder NAME SEED

for seed in "${SEED_LIST[@]}"; do  # IID: fedsoda and its fair control
  f=$(folder sst2-fedsoda "$seed"); [ "$seed" = 0 ] || share sst2-fedsoda "$f" profile prune
  run "$f" specs/sst2-fedsoda.toml --set "run.seed=$seed"; runs+=("$f")
  p=$(folder sst2-fedpetuning-nf4 "$seed"); [ "$seed" = 0 ] || share sst2-fedpetuning-nf4 "$p" base quantize
  run "$p" specs/sst2-fedpetuning-nf4.toml --set "run.seed=$seed"; runs+=("$p")
done
share sst2-fedsoda sst2-central profile prune align quantize
run sst2-central specs/sst2-central.toml; runs+=(sst2-central)
if [ "${FULL:-0}" = 1 ]; then  # issue 11: the same runs with the align that trains against the client's NF4
  for seed in 0 1 2; do
    f=$(folder sst2-fedsoda-align-ste "$seed"); share sst2-fedsoda "$f" profile prune
    run "$f" specs/sst2-fedsoda.toml --set "run.seed=$seed" --set align.quant_aware=ste --set 'eval.targets=["plugin","sub"]'; runs+=("$f")
  done
fi
for seed in "${SEED_LIST[@]}"; do  # Dirichlet 0.5
  f=$(folder sst2-fedsoda-dir05 "$seed"); share "$(folder sst2-fedsoda "$seed")" "$f" profile prune align quantize
  run "$f" specs/sst2-fedsoda.toml --set "run.seed=$seed" $DIR --set 'eval.targets=["plugin","sub"]'; runs+=("$f")
  p=$(folder sst2-fedpetuning-nf4-dir05 "$seed"); share sst2-fedpetuning-nf4 "$p" base quantize
  run "$p" specs/sst2-fedpetuning-nf4.toml --set "run.seed=$seed" $DIR; runs+=("$p")
done
share sst2-fedsoda sst2-local profile prune align quantize
run sst2-local specs/sst2-fedsoda.toml --set run.method=local --set 'eval.targets=["plugin","sub"]'; runs+=(sst2-local)
share sst2-fedsoda sst2-local-dir05 profile prune align quantize
run sst2-local-dir05 specs/sst2-fedsoda.toml --set run.method=local $DIR --set 'eval.targets=["plugin","sub"]'; runs+=(sst2-local-dir05)
if [ "${MOMENTUM:-0}" = 1 ]; then  # server momentum under label skew, beside the fedavg runs above
  for seed in "${SEED_LIST[@]}"; do
    f=$(folder sst2-fedsoda-dir05-fedavgm "$seed"); share "$(folder sst2-fedsoda-dir05 "$seed")" "$f" profile prune align quantize
    run "$f" specs/sst2-fedsoda.toml --set "run.seed=$seed" $DIR --set federate.aggregator=fedavgm --set 'eval.targets=["plugin","sub"]'; runs+=("$f")
  done
fi
if [ "${FULL:-0}" = 1 ]; then
  run sst2-fedpetuning specs/sst2-fedpetuning.toml; runs+=(sst2-fedpetuning)
  run sst2-fedot specs/sst2-fedot.toml; runs+=(sst2-fedot)
  share sst2-fedpetuning sst2-fedpetuning-dir05 base quantize
  run sst2-fedpetuning-dir05 specs/sst2-fedpetuning.toml $DIR; runs+=(sst2-fedpetuning-dir05)
  share sst2-fedot sst2-fedot-dir05 prune align quantize
  run sst2-fedot-dir05 specs/sst2-fedot.toml $DIR; runs+=(sst2-fedot-dir05)
fi

"$fedsoda" report "${runs[@]/#/runs/}" --out runs/sst2-report
