#!/usr/bin/env bash
# Cutting the traffic that recurs every round (issue 13): the headline's fedsoda spec (SST-2, seed 0),
# with the realignment sent as a delta (federate.realign_wire = "delta", the default), then adapters on
# a bf16 wire, then realignment on measured drift instead of every 3 rounds.
#
#   bash bench/traffic.sh [FEDPETUNING_RUN]     about 25 minutes on 2 CPU cores
#
#   traffic-fp32         delta realignment, fp32 adapters: against the headline's sst2-fedsoda (whole
#                        layers, same everything else) it shows the delta's bytes at equal accuracy
#   traffic-bf16         + federate.wire_dtype = "bf16"
#   traffic-bf16-drift   + federate.realign_when = "drift", realign_every = 1 (drift decides each round)
#
# FEDPETUNING_RUN (default runs/sst2-fedpetuning-nf4): the fair control the traffic is compared with.
# Prints one markdown table; each run's own numbers are in runs/<folder>/ (eval/results.json,
# federate/summary.json, federate/metrics.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
control=${1:-runs/sst2-fedpetuning-nf4}
run() { local folder=$1; shift; echo "== $folder ($(date +%T))"
  "$fedsoda" run specs/sst2-fedsoda.toml "$@" --set "run.name=$folder" --set 'eval.targets=["plugin","sub"]' --workdir "runs/$folder" > "runs/$folder.log" 2>&1 \
    || { tail -20 "runs/$folder.log"; exit 1; }; }
share() { reuse "runs/$1" "runs/$2" profile prune align quantize; }

run traffic-fp32
share traffic-fp32 traffic-bf16
run traffic-bf16 --set federate.wire_dtype=bf16
share traffic-fp32 traffic-bf16-drift
run traffic-bf16-drift --set federate.wire_dtype=bf16 --set federate.realign_when=drift --set federate.realign_every=1

"${PYTHON:-.venv/bin/python}" - "$control" traffic-fp32 traffic-bf16 traffic-bf16-drift <<'EOF'
import json, sys
from pathlib import Path

from fedsoda_cli.round_record import RoundRecord  # the one reader of metrics.jsonl lines: names as written

def load(folder):
    folder = Path(folder if "/" in folder else f"runs/{folder}")
    summary = json.loads((folder / "federate" / "summary.json").read_text())
    results = json.loads((folder / "eval" / "results.json").read_text())
    lines = (folder / "federate" / "metrics.jsonl").read_text().splitlines()
    rounds = [RoundRecord.from_json(json.loads(line)) for line in lines if line.strip()]
    return folder.name, summary["bytes"], results, rounds

control = load(sys.argv[1])
recurring = lambda b: b["adapter_down"] + b["adapter_up"] + b["realign"]
c_rec, c_tot = recurring(control[1]), control[1]["total"]
print(f"control: {control[0]}: recurring {c_rec / 2**20:.2f} MiB, total {c_tot / 2**20:.2f} MiB, plugin {100 * control[2]['plugin']['accuracy']:.1f} %\n")
print("| run | plugin | sub | adapters (MiB) | realign (MiB) | realignments | recurring vs control | total vs control |")
print("|---|---|---|---|---|---|---|---|")
for folder in sys.argv[2:]:
    name, b, results, rounds = load(folder)
    n = sum(1 for r in rounds if r.bytes_realign)
    print(f"| {name} | {100 * results['plugin']['accuracy']:.1f} | {100 * results['sub']['accuracy']:.1f} | "
          f"{(b['adapter_down'] + b['adapter_up']) / 2**20:.2f} | {b['realign'] / 2**20:.2f} | {n} | "
          f"{recurring(b) / c_rec:.3f}x | {b['total'] / c_tot:.3f}x |")
    drift = [r.drift.ratio for r in rounds if r.drift is not None]
    if drift:
        print(f"|  drift per round (x reference) | {', '.join(f'{d:.2f}' for d in drift)} | | | | | | |")
EOF
