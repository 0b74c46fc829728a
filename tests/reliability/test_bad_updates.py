"""Client updates the server must not aggregate, end to end through `fedsoda federate` with real
worker processes: updates that diverge to NaN/Inf and updates with a huge norm are excluded with the
client named; when too few remain the run stops with one line and keeps its last good round.

Updates with wrong tensor names or shapes cannot come out of an honest worker; they are screened by
the same check, proven with crafted updates in tests/federated/test_server.py and test_validation.py.
"""

from __future__ import annotations

import re

import pytest

from .conftest import (
    STAGES,
    assert_fails,
    assert_no_scratch_left,
    fedsoda,
    snapshot,
    stage_states,
)

CASES = {
    # case: (overrides, why each client is excluded)
    "NaN or Inf": (["federate.optimizer='sgd'", "federate.lr=1e38", "federate.max_update_norm=1e300"], "contains NaN or Inf"),
    "a huge norm": (["federate.max_update_norm=1e-9"], "exceeds federate.max_update_norm = 1e-09"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
def test_unusable_updates_are_excluded_and_the_run_stops_cleanly(case, spec_path, workdir):
    overrides, reason = CASES[case]
    stages_before = {rel: d for rel, d in snapshot(workdir).items() if not rel.startswith("federate.checkpoints")}
    result = fedsoda("federate", spec_path, "--workdir", workdir, *[a for o in overrides for a in ("--set", o)])
    line = assert_fails(
        result,
        "runtime",
        "only 0 valid client update(s), federate.min_clients = 1",
        "client 0: ",
        "client 1: ",
        reason,
        "stopped, last good round: ",
        "Fix the cause and rerun with --resume",
    )
    assert line.count(reason) == 2
    failed_round = int(re.search(r"error: round (\d+):", line).group(1))
    out = " ".join(result.stdout.split())
    assert f"round {failed_round}: client 0 excluded" in out and f"round {failed_round}: client 1 excluded" in out
    assert {rel: d for rel, d in snapshot(workdir).items() if not rel.startswith("federate.checkpoints")} == stages_before
    assert_no_scratch_left(workdir)
    assert stage_states(spec_path, workdir) == dict.fromkeys(STAGES, "done")
