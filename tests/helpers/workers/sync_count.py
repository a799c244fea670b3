"""Rank worker: count the host-sync operations of real engine steps; each rank writes a JSON.

Usage: sync_count.py JOB.json OUT_DIR. For every model in the job, an engine
serves a mix of prompts (chunked prefills, continuations, batched decode)
while a TorchDispatchMode counts, per step, the ops that read a device value
on the host or build a tensor from Python data: inside the model's forward
(must be none) and in the whole step (a small fixed number, on host arrays).
"""

import collections
import json
import sys
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

from dstp.distributed import shutdown
from dstp.engine.llm_engine import Engine, EngineConfig
from dstp.engine.sampling_params import SamplingParams
from dstp.worker.model_runner import ModelRunner

# On a GPU each of these waits for the device (a scalar read, a data-dependent
# shape) or copies host data to it (a tensor built from a Python list).
SYNC_OPS = ("_local_scalar_dense", "aten.item", "is_nonzero", "aten.nonzero", "lift_fresh")


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.in_forward = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(op in name for op in SYNC_OPS):
            self.counts[("forward:" if self.in_forward else "step:") + name] += 1
        return func(*args, **(kwargs or {}))


steps: list[dict[str, int]] = []
_execute = ModelRunner.execute


def counted_execute(self: ModelRunner, plan):
    counter = SyncCounter()

    def enter(*_):
        counter.in_forward += 1

    def leave(*_):
        counter.in_forward -= 1

    hooks = [self.base_model.register_forward_pre_hook(enter)]
    hooks.append(self.base_model.register_forward_hook(leave))
    try:
        with counter:
            logits = _execute(self, plan)
    finally:
        for hook in hooks:
            hook.remove()
    steps.append({"tokens": plan.num_tokens, **counter.counts})
    return logits


ModelRunner.execute = counted_execute
argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # deepspeed adds it
job = json.loads(Path(argv[0]).read_text())
out_dir = Path(argv[1])
for name, model in job["models"].items():
    steps.clear()
    engine = Engine(EngineConfig(model, dtype="float32", num_blocks=64, max_num_batched_tokens=24))
    if engine.tp.is_driver:
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        engine.generate(job["prompts"], params)
        engine.shutdown()
    else:
        engine.run_follower()
    (out_dir / f"{name}.rank{engine.tp.rank}.json").write_text(json.dumps(steps))
shutdown(0)
