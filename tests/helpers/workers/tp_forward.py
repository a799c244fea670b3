"""Rank worker: load each model with dstp.load, record logits and greedy tokens.

Usage: tp_forward.py JOB.json OUT_DIR. Rank 0 writes OUT_DIR/<name>.safetensors
(logits, greedy tokens); every rank writes OUT_DIR/<name>.rank<r>.json with
its parameter bytes.
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import dstp
from dstp.distributed import shutdown

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # deepspeed adds it
job = json.loads(Path(argv[0]).read_text())
out = argv[1]
rank = int(os.environ.get("RANK", 0))
dtype = getattr(torch, job.get("dtype", "float32"))
ids = torch.tensor(job["prompt"], dtype=torch.long)
for name, path in job["models"].items():
    model = dstp.load(path, dtype=dtype)
    with torch.inference_mode():
        logits = model(ids).logits.float()
        greedy = model.generate(
            ids,
            max_new_tokens=job["new_tokens"],
            do_sample=False,
            min_new_tokens=job["new_tokens"],
            pad_token_id=0,
        )
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    info = {
        "param_bytes": params,
        "dtype": str(next(model.parameters()).dtype),
        "fused_layers": model.dstp.fused_layers,  # decoder layers in the policy's fused form
        "num_layers": model.config.num_hidden_layers,
    }
    Path(f"{out}/{name}.rank{rank}.json").write_text(json.dumps(info))
    if rank == 0:
        save_file(
            {"logits": logits.contiguous(), "greedy": greedy.contiguous()},
            f"{out}/{name}.safetensors",
        )
print("worker done", flush=True)
shutdown(exit_code=0)  # leave the group together; skip gloo's racy C++ teardown
