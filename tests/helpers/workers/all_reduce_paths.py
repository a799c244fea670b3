"""Rank worker: the TP group's all-reduce and gathers are right and stay in shared memory.

Usage: all_reduce_paths.py OUT_DIR. Each rank sums and gathers seeded random
tensors of every float dtype and writes OUT_DIR/rank<r>.json: the results as
lists, the group's flags, and how many calls reached the process group's
(gloo's) collectives.
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


def counting(collective):
    def call(*args, **kwargs):
        global gloo_calls
        gloo_calls += 1
        return collective(*args, **kwargs)

    return call


for name in ("all_reduce", "all_gather", "gather"):  # DeepSpeed looks them up per call
    setattr(tdist, name, counting(getattr(tdist, name)))
sums, gathers = {}, {}
for dtype in ("bfloat16", "float16", "float32"):
    for shape in ((1, 5), (1, 2048), (128, 2048)):
        gen = torch.Generator().manual_seed(1000 * tp.rank + shape[0])
        x = torch.randn(shape, generator=gen).to(getattr(torch, dtype))
        tp.all_reduce(x)
        sums[f"{dtype}{list(shape)}"] = x.float().flatten().tolist()
        part = torch.randn(shape, generator=gen).to(getattr(torch, dtype))
        on_driver = tp.gather_to_driver(part, dim=-1)
        everywhere = tp.all_gather(part, dim=0)
        gathers[f"{dtype}{list(shape)}"] = {
            "part": part.float().flatten().tolist(),
            "driver": None if on_driver is None else on_driver.float().flatten().tolist(),
            "all": everywhere.float().flatten().tolist(),
        }
fast_calls = gloo_calls
result = {
    "fast_all_reduce": tp.fast_all_reduce,
    "all_reduce_in_fp32": tp.all_reduce_in_fp32,
    "gloo_calls": fast_calls,
    "sums": sums,
    "gathers": gathers,
}
(out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result))
shutdown(exit_code=0)
