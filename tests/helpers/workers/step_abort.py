"""Rank worker: a step that fails on rank 1 aborts the group, and rank 0 ends at once.

Usage: step_abort.py SECONDS (the step timeout). Rank 0 drives: it sends a command and
enters the step's all-reduce. Rank 1 follows through ``serve._follow``, the server's
follower loop, whose step raises after the command arrived; then it exits as
``serve.main`` does. Rank 0 prints how long its all-reduce waited, what it raised, and
which rank the store names as the first to abort.
"""

import json
import os
import sys
import time

import torch

from dstp.distributed import abort_process_groups, init_tp, shutdown
from dstp.server.serve import _follow
from dstp.worker.step_plan import Command, receive, send_command

timeout_s = float(sys.argv[1])
tp = init_tp(2)
tp.set_collective_timeout(timeout_s)


class FailingFollower:
    """A follower engine whose step raises mid-step (rank 0 is in its collective)."""

    tp = tp

    def run_follower(self) -> None:
        receive(self.tp)
        time.sleep(0.5)  # rank 0 is inside the all-reduce by now
        raise RuntimeError("the step failed on rank 1")


if tp.rank == 1:
    shutdown(exit_code=_follow(FailingFollower()))  # as serve.main ends a rank

send_command(tp, Command.HEARTBEAT)
start = time.monotonic()
try:
    tp.all_reduce(torch.ones(8))
    outcome = "returned"
except Exception as exc:  # what rank 0's engine loop sees
    outcome = type(exc).__name__
waited = time.monotonic() - start
first = abort_process_groups()  # as the server's on_fatal does
print(json.dumps({"waited_s": waited, "outcome": outcome, "first": first}), flush=True)
os._exit(0)
