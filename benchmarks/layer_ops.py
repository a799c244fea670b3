"""Ops per decoder layer of a batch-8 decode step, HF's layer against dstp's fused one.

Issue 22's method: a random bf16 Llama (hidden 256), 8 requests decoding together with
temperature, top-p, top-k, repetition penalty and seeds; a ``TorchDispatchMode`` counts
the ops that would launch a kernel (not views, not bare allocations) over five decode
steps; the layer share is (8-layer model - 4-layer model) / 4. Each configuration runs
in its own process (``DSTP_CPU_KERNELS`` is read once per process).

    python benchmarks/layer_ops.py            # the table, four subprocesses
    python benchmarks/layer_ops.py --one ...  # one configuration (what the table runs)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
STEPS = 5
BATCH = 8
# ops that create a view, an empty tensor or only read metadata: no kernel on a GPU
NOT_KERNELS = {
    "view", "_unsafe_view", "reshape", "alias", "as_strided", "expand", "permute",
    "transpose", "t", "unsqueeze", "squeeze", "select", "slice", "narrow", "split",
    "split_with_sizes", "unbind", "chunk", "detach", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "view_as_real",
    "view_as_complex", "_reshape_alias", "sym_size", "sym_stride", "sym_numel",
    "is_same_size", "_has_compatible_shallow_copy_type", "dim", "size", "stride",
}  # fmt: skip


class OpCounter(TorchDispatchMode):
    """Counts kernel-launching ops while ``active``, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.active and name not in NOT_KERNELS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class CountedKernels:
    """dstp's kernel extension with each call counted: a pybind call is one kernel, which a
    dispatch mode does not see (it sees only the ATen ops around it)."""

    def __init__(self, ops: object, counters: list[OpCounter]) -> None:
        self._ops, self._counters = ops, counters

    def __getattr__(self, name: str):
        attr = getattr(self._ops, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            for counter in self._counters:
                if counter.active:
                    counter.counts[f"dstp.{name}"] += 1
            return attr(*args, **kwargs)

        return counted


def count(layers: int, fused: bool) -> dict:
    """Ops of the whole step and of the model's forward over ``STEPS`` decode steps."""
    from dstp.engine.llm_engine import Engine, EngineConfig
    from dstp.engine.sampling_params import SamplingParams
    from tests.helpers.tiny_models import llama_config, save_random_model

    config = llama_config(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=512,
    )
    path = save_random_model(config, Path(tempfile.mkdtemp()) / "llama")
    engine = Engine(EngineConfig(str(path), dtype="bfloat16", num_blocks=128, fused_layers=fused))
    params = SamplingParams(
        max_tokens=STEPS + 4,
        temperature=0.8,
        top_p=0.9,
        top_k=40,
        repetition_penalty=1.2,
        seed=7,
        ignore_eos=True,
    )
    for i in range(BATCH):
        engine.add_request(f"r{i}", [3 + i, 17, 29, 101 + i, 5], params)
    engine.step()  # the prefill
    engine.step()  # one warm decode
    step_ops, forward_ops = OpCounter(), OpCounter()
    from dstp.cpu import kernels as cpu_kernels

    built = cpu_kernels._ops()
    if built is not None:
        counted = CountedKernels(built, [step_ops, forward_ops])
        cpu_kernels._ops = lambda: counted
    base = engine.runner.base_model
    hooks = [
        base.register_forward_pre_hook(lambda *_: setattr(forward_ops, "active", True)),
        base.register_forward_hook(lambda *_: setattr(forward_ops, "active", False)),
    ]
    step_ops.active = True
    with step_ops, forward_ops:
        for _ in range(STEPS):
            engine.step()
    for hook in hooks:
        hook.remove()
    engine.shutdown()
    return {
        "step": sum(step_ops.counts.values()) / STEPS,
        "forward": sum(forward_ops.counts.values()) / STEPS,
        "forward_ops": dict(forward_ops.counts),
        "fused_layers": engine.runner.sharded.fused_layers,
    }


def _run_one(layers: int, fused: bool, kernels: bool) -> dict:
    env = dict(os.environ, DSTP_CPU_KERNELS="1" if kernels else "0", PYTHONPATH=str(REPO))
    argv = [sys.executable, __file__, "--one", str(layers), str(int(fused))]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", nargs=2, type=int, metavar=("LAYERS", "FUSED"))
    parser.add_argument("--show-ops", action="store_true", help="per-op counts of one layer")
    args = parser.parse_args()
    if args.one:
        torch.set_num_threads(1)
        print(json.dumps(count(args.one[0], bool(args.one[1]))))
        return
    print("| path | decoder layer | ops per decoder layer | ops per step outside the layers |")
    print("|---|---|---|---|")
    for kernels in (True, False):
        for fused in (False, True):
            big, small = _run_one(8, fused, kernels), _run_one(4, fused, kernels)
            per_layer = (big["forward"] - small["forward"]) / 4
            outside = big["step"] - 8 * per_layer
            path = "dstp with its CPU kernels" if kernels else "`DSTP_CPU_KERNELS=0`"
            layer = f"fused ({big['fused_layers']}/8)" if fused else "HF's"
            print(f"| {path} | {layer} | {per_layer:.1f} | {outside:.0f} |")
            if args.show_ops:
                ops = collections.Counter(big["forward_ops"])
                ops.subtract(small["forward_ops"])
                shown = {k: v / 4 / STEPS for k, v in sorted(ops.items()) if v}
                print(f"|   | per layer: {shown} | | |")


if __name__ == "__main__":
    main()
