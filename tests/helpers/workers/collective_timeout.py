"""Rank worker: once serving, a collective whose peer never comes times out.

Usage: collective_timeout.py SECONDS. Both ranks set the serving timeout; rank 0 then
stalls (as a rank whose step failed, or that hangs) and rank 1 waits for the next step
plan on the host group, as a follower does. Rank 1 prints how long it waited and what
it raised.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as tdist

from dstp.distributed import init_tp

timeout_s = float(sys.argv[1])
tp = init_tp(2)
tp.set_collective_timeout(timeout_s)
if tp.rank == 0:
    time.sleep(timeout_s * 4)  # never joins in time
    sys.exit(0)
start = time.monotonic()
try:
    tdist.broadcast(torch.zeros(4, dtype=torch.long), src=0, group=tp.cpu_group)
    outcome = "returned"
except Exception as exc:  # what a follower's run loop sees
    outcome = type(exc).__name__
print(json.dumps({"waited_s": time.monotonic() - start, "outcome": outcome}), flush=True)
os._exit(0)  # no exit-time barrier with a peer that is gone
