"""Rank worker: the TP group's all-reduce sums right and stays in shared memory.

Usage: all_reduce_paths.py OUT_DIR. Each rank sums seeded random tensors of
every float dtype and writes OUT_DIR/rank<r>.json: its inputs' seeds, the
sums' bytes as lists, the group's flags, and how many calls reached the
process group's (gloo's) ``all_reduce``.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from dstp.distributed import init_tp, shutdown

out = Path(sys.argv[1])
tp = init_tp()
gloo_calls = 0
_process_group_all_reduce = tdist.all_reduce


def counting_all_reduce(*args, **kwargs):
    global gloo_calls
    gloo_calls += 1
    return _process_group_all_reduce(*args, **kwargs)


tdist.all_reduce = counting_all_reduce  # DeepSpeed's fallback looks it up per call
sums = {}
for dtype in ("bfloat16", "float16", "float32"):
    for shape in ((1, 5), (1, 2048), (128, 2048)):
        gen = torch.Generator().manual_seed(1000 * tp.rank + shape[0])
        x = torch.randn(shape, generator=gen).to(getattr(torch, dtype))
        tp.all_reduce(x)
        sums[f"{dtype}{list(shape)}"] = x.float().flatten().tolist()
fast_calls = gloo_calls
result = {
    "fast_all_reduce": tp.fast_all_reduce,
    "all_reduce_in_fp32": tp.all_reduce_in_fp32,
    "gloo_calls": fast_calls,
    "sums": sums,
}
(out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result))
shutdown(exit_code=0)
