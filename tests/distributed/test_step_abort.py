"""Failures that end (issue 24 item 3): a step that fails on one rank aborts the process
group and that rank exits at once, so a peer inside the step's collective fails within a
fraction of the step timeout, not after it.

Two real ranks over gloo (NCCL takes the same call, ``_abort_process_group``): rank 1's
step raises while rank 0 waits in the all-reduce. Without the abort-and-exit, rank 1 sits
in the exit-time barrier and rank 0 waits out the whole timeout.
"""

from __future__ import annotations

import json

from tests.helpers.launcher import run_ranks

TIMEOUT_S = 9.0


def test_a_failed_step_on_one_rank_ends_the_peer_in_its_collective_at_once():
    procs = run_ranks(
        2,
        ["tests/helpers/workers/step_abort.py", str(TIMEOUT_S)],
        120,
        DSTP_FAST_ALLREDUCE="0",  # the shm all-reduce spins without a timeout: gloo's
    )
    assert procs[1].returncode == 1, procs[1].stdout[-3000:]
    assert "the step failed on rank 1" in procs[1].stdout
    result = json.loads(procs[0].stdout.strip().splitlines()[-1])
    assert result["outcome"] != "returned", result
    assert result["waited_s"] < TIMEOUT_S / 3, result  # ~0.5 s with the abort; 9 s without
    assert result["first"] == 1, result  # rank 0's log names the rank that aborted first
