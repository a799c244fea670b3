"""One rank of gpu_check's TP=2-on-one-device check: logits of the shared prompt.

Usage (with RANK, WORLD_SIZE, ... set): gpu_check_worker.py MODEL OUT_DIR. Rank 0
writes ``logits.pt`` (on the host) for the check to compare with HF's.
"""

import faulthandler
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dstp  # noqa: E402
from benchmarks.gpu_check import _prompt  # noqa: E402
from dstp.distributed import get_tp, shutdown  # noqa: E402

faulthandler.dump_traceback_later(75, exit=True)  # a hang shows where (gpu_check: 90 s)
model_path, out = sys.argv[1], Path(sys.argv[2])
model = dstp.load(model_path, torch.float32)
tp = get_tp()
ids = torch.tensor([_prompt(model.config.vocab_size)], device=tp.device)
with torch.inference_mode():
    logits = model(ids).logits.float().cpu()
if tp.is_driver:
    torch.save(logits, out / "logits.pt")
shutdown(0)
