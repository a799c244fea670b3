"""Where a dstp step's time goes: linear, all-reduce, attention, other ops, Python.

Three complementary views, each run on every rank (each rank must execute the
same collectives):

1. ``torch.profiler`` self CPU time per op, grouped into categories; whatever
   the ops do not cover (Python, HF ``generate`` logic, profiler overhead) is
   ``untracked``. Profiler overhead inflates many-small-op phases (decode).
2. Light timers: the TP group's ``all_reduce`` wrapped with ``perf_counter``
   (no profiler), giving communication time per step at full speed. It
   includes waiting for the slower rank, which is what a step pays.
3. "Free communication": ``all_reduce`` replaced by identity (results are
   wrong, timing is not). The step-time difference is the whole cost of
   communication, synchronisation included.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from benchmarks.timing import barrier, generate, prompt_ids

CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("comm", ("all_reduce", "allreduce", "all_gather", "allgather", "gather", "broadcast")),
    (
        "attention",
        ("scaled_dot_product", "flash_attention", "softmax", "efficient_attention"),
    ),
    (
        "linear",
        (
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::baddbmm",
            "mkldnn",
            "onednn",
            "dstp::gemv",
            "dstp::gemm",
        ),
    ),
)


def category(op: str) -> str:
    low = op.lower()
    for name, needles in CATEGORIES:
        if any(n in low for n in needles):
            return name
    return "other_ops"


def _profiled(fn: Callable[[], Any]) -> dict:
    from torch.profiler import ProfilerActivity, profile

    barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.inference_mode():
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    per_cat: dict[str, float] = defaultdict(float)
    ops = []
    for evt in prof.key_averages():
        self_s = evt.self_cpu_time_total / 1e6
        per_cat[category(evt.key)] += self_s
        ops.append((self_s, evt.key, evt.count))
    tracked = sum(per_cat.values())
    per_cat["untracked"] = max(0.0, wall - tracked)
    ops.sort(reverse=True)
    return {
        "wall_s": wall,
        "seconds": dict(per_cat),
        "fraction": {k: v / wall for k, v in per_cat.items()},
        "top_ops": [{"op": k, "self_s": s, "calls": c} for s, k, c in ops[:12]],
    }


@contextmanager
def timed_all_reduce(tp: Any) -> Iterator[dict]:
    """Wrap ``tp.all_reduce`` with a timer (TPGroup is frozen: set on the instance)."""
    original = tp.all_reduce
    acc = {"calls": 0, "seconds": 0.0}

    def wrapped(tensor: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = original(tensor)
        acc["seconds"] += time.perf_counter() - start
        acc["calls"] += 1
        return out

    object.__setattr__(tp, "all_reduce", wrapped)
    try:
        yield acc
    finally:
        object.__delattr__(tp, "all_reduce")


@contextmanager
def free_all_reduce(tp: Any) -> Iterator[None]:
    object.__setattr__(tp, "all_reduce", lambda tensor: tensor)
    try:
        yield
    finally:
        object.__delattr__(tp, "all_reduce")


def _decode_steps(model: Any, vocab: int, steps: int) -> Callable[[], Any]:
    ids = prompt_ids(1, 32, vocab)
    return lambda: generate(model, ids, steps)


def _prefill(model: Any, vocab: int, length: int) -> Callable[[], Any]:
    ids = prompt_ids(1, length, vocab)
    return lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1)


def _wall(fn: Callable[[], Any], repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        with torch.inference_mode():
            fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(model: Any, tp: Any, vocab: int, prefill_len: int = 128, steps: int = 16) -> dict:
    """All three views for a ``prefill_len`` prefill and a ``steps``-token batch-1 decode."""
    phases = {
        "prefill": _prefill(model, vocab, prefill_len),
        "decode": _decode_steps(model, vocab, steps),
    }
    # decode phase = generate(prompt 32, `steps` tokens): subtract a 1-token generate
    one_step = _decode_steps(model, vocab, 1)
    out: dict[str, Any] = {"prefill_tokens": prefill_len, "decode_steps": steps}
    for name, fn in phases.items():
        _wall(fn, 1)  # warm-up
        out[f"{name}_profile"] = _profiled(fn)
        with timed_all_reduce(tp) as acc:
            wall = _wall(fn, 1)
        out[f"{name}_timers"] = {
            "wall_s": wall,
            "all_reduce_s": acc["seconds"],
            "all_reduce_calls": acc["calls"],
            "all_reduce_fraction": acc["seconds"] / wall,
        }
        real = _wall(fn)
        with free_all_reduce(tp):
            free = _wall(fn)
        out[f"{name}_free_comm"] = {
            "wall_s": real,
            "wall_no_allreduce_s": free,
            "comm_cost_fraction": (real - free) / real,
        }
    base = _wall(one_step)
    dec = out["decode_free_comm"]
    dec["step_s"] = (dec["wall_s"] - base) / (steps - 1)
    with free_all_reduce(tp):
        base_free = _wall(one_step)
    dec["step_no_allreduce_s"] = (dec["wall_no_allreduce_s"] - base_free) / (steps - 1)
    return out
