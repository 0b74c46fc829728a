# Sourced by the bench/*.sh scripts (after `cd` to the repository root): what every one of them does.
# shellcheck shell=bash
fedsoda=${FEDSODA:-.venv/bin/fedsoda}
mkdir -p runs

# reuse FROM TO STAGE...: copy finished stage folders that the two workdirs share (those that do not
# depend on the seed or the partition) from workdir FROM into workdir TO, as `fedsoda run --seeds`
# does. Their manifests stay valid, so `fedsoda run` in TO finds them up to date. A stage TO already
# has is left as it is. Files are hard-linked where the filesystem allows (a copy otherwise): fedsoda
# never writes into a finished stage folder, it swaps a new one in, so FROM's files stay as they were,
# and 24 sibling workdirs no longer carry 700 MB of float checkpoints each (session 8 filled the disk).
reuse() {
  local from=$1 to=$2; shift 2
  mkdir -p "$to"
  for stage in "$@"; do
    [ -d "$to/$stage" ] || cp -al "$from/$stage" "$to/$stage" 2>/dev/null || { rm -rf "$to/$stage"; cp -a "$from/$stage" "$to/$stage"; }
  done
}

# timed_run WORKDIR [fedsoda run arguments...]: one `fedsoda run` into WORKDIR, its /usr/bin/time -v
# output (wall time, peak RSS) and stderr in WORKDIR.time; the benchmark stops at the first failure.
timed_run() {
  local workdir=$1; shift
  echo "== ${workdir#runs/} ($(date +%T))"
  /usr/bin/time -v "$fedsoda" run "$@" --workdir "$workdir" 2> "$workdir.time" || { tail -20 "$workdir.time"; exit 1; }
}
