"""Rank worker: dstp.load a checkpoint and report; exit 1 with the error text on failure.

Usage: load_only.py PATH_TEMPLATE [--allow-pickle]; ``{rank}`` in the path is
replaced by this rank's number (to give ranks different views of the disk).
"""

import os
import sys

import dstp
from dstp.distributed import shutdown

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
path = argv[0].replace("{rank}", os.environ.get("RANK", "0"))
try:
    dstp.load(path, allow_pickle="--allow-pickle" in argv)
except Exception as exc:
    print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
    sys.exit(1)
print("LOADED", flush=True)
shutdown(exit_code=0)
