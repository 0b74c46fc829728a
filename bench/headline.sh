#!/usr/bin/env bash
# The headline benchmark: FedSODA against FedPETuning and FedOT with equal budgets, then the report.
# Usage: bash bench/headline.sh sst2   (or boolq, gsm8k); results in runs/<task>-report/
set -euo pipefail
task=${1:-sst2}
cd "$(dirname "$0")/.."
for method in fedsoda fedpetuning fedot; do
  /usr/bin/time -v fedsoda run "specs/${task}-${method}.toml" 2> "runs/${task}-${method}.time" || { cat "runs/${task}-${method}.time"; exit 1; }
done
fedsoda report "runs/${task}-fedsoda" "runs/${task}-fedpetuning" "runs/${task}-fedot" --out "runs/${task}-report"
