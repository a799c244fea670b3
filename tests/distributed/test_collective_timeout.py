"""Failures that end (issue 24 item 3): once serving, a rank waiting on a peer that never
comes gives up within the step timeout, instead of the process group's 30 minutes.

Two real ranks over gloo (the NCCL groups get the same call, ``_set_pg_timeout``): rank 0
stalls as a rank whose step failed or hung; rank 1 waits for the next step plan as a
follower does, and must raise after about the timeout.
"""

from __future__ import annotations

import json

from tests.helpers.launcher import run_ranks

TIMEOUT_S = 3.0


def test_a_follower_waiting_on_a_stalled_rank_gives_up_within_the_timeout():
    procs = run_ranks(2, ["tests/helpers/workers/collective_timeout.py", str(TIMEOUT_S)], 120)
    out = procs[1].stdout.strip().splitlines()
    result = json.loads(out[-1])
    assert result["outcome"] != "returned", result
    # rank 0 exits after 4x the timeout: a wait that long means the timeout did not apply
    assert TIMEOUT_S * 0.8 <= result["waited_s"] < TIMEOUT_S * 2, result
