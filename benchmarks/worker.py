"""One rank of one benchmark configuration: load, measure, write JSON.

Usage (the harness starts it; see benchmarks/launch.py):
    python -m benchmarks.worker PLAN.json
with RANK/WORLD_SIZE/... set for TP runs. Every rank writes
``<out>/<config>.rank<r>.json`` (its memory); rank 0 adds the timings.

Implementations:
* ``dstp``: ``dstp.load`` (meta build + shard-on-read) and HF ``generate``.
* ``ds_autotp``: HF ``from_pretrained`` on every rank, then DeepSpeed
  ``init_inference`` AutoTP (``replace_with_kernel_inject=False``). For a fair
  comparison each rank gets the same disjoint cores and thread count as dstp
  (unpinned, two 2-thread ranks oversubscribe two cores).
* ``hf``: one process, ``from_pretrained``, all cores (``threads`` overrides).
* ``dstp_engine``: dstp's continuous-batching ``Engine`` running the
  64-request workload (rank 0 drives, the others follow).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def pin_threads(threads: int | None) -> int:
    """Disjoint cores per local rank, threads = cores / local ranks (dstp's policy)."""
    cores = sorted(os.sched_getaffinity(0))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    n = threads or max(1, len(cores) // local)
    if local > 1 and len(cores) >= local * n:
        os.sched_setaffinity(0, cores[local_rank * n : (local_rank + 1) * n])
    torch.set_num_threads(n)
    return n


PHASE_PEAKS: dict[str, float] = {}  # phase -> peak RSS (GB) during it


def progress(stage: str) -> None:
    """A log line per stage with this rank's RSS (a run that dies shows where)."""
    from benchmarks.memory import reset_peak, status

    now = status()
    rss, peak = now.get("VmRSS", 0) / 1e9, now.get("VmHWM", 0) / 1e9
    print(
        f"rank {_rank()}: {stage} (RSS {rss:.2f} GB, peak since last line {peak:.2f} GB)",
        flush=True,
    )
    PHASE_PEAKS[stage.split(":")[0]] = peak
    reset_peak()
    if PARTIAL:
        PARTIAL["memory"]["phase_peaks_gb"] = PHASE_PEAKS
        _write(PARTIAL)


PARTIAL: dict[str, Any] = {}  # this rank's results so far, rewritten after each phase


def _write(result: dict) -> None:
    plan = result["plan"]
    out = Path(plan["out"]) / f"{plan['config']}.rank{result['rank']}.json"
    out.write_text(json.dumps(result, indent=1))


def load(plan: dict) -> tuple[Any, Any]:
    """(model to call forward / generate on, dstp TP group or None)."""
    dtype = getattr(torch, plan["dtype"])
    impl = plan["impl"]
    if impl == "dstp":
        import dstp
        from dstp.distributed import get_tp

        model = dstp.load(plan["model"], dtype=dtype)
        return model, get_tp()
    from transformers import AutoModelForCausalLM

    if impl == "hf":
        if plan.get("threads"):
            torch.set_num_threads(plan["threads"])
        model = AutoModelForCausalLM.from_pretrained(plan["model"], dtype=dtype)
        return model.eval(), None
    if impl == "ds_autotp":
        import deepspeed

        pin_threads(plan.get("threads"))
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        model = AutoModelForCausalLM.from_pretrained(plan["model"], dtype=dtype).eval()
        engine = deepspeed.init_inference(
            model,
            tensor_parallel={"tp_size": int(os.environ.get("WORLD_SIZE", "1"))},
            dtype=dtype,
            replace_with_kernel_inject=False,
        )
        return engine.module, None
    raise ValueError(f"unknown implementation {impl!r}")


def run_engine(plan: dict, result: dict) -> None:
    """Engine decode rates and workload: memory includes the KV cache the engine allocates."""
    from benchmarks import timing, workload
    from benchmarks.memory import PeakSampler
    from dstp.engine.llm_engine import Engine, EngineConfig

    start = time.perf_counter()
    with PeakSampler() as sampler:
        engine = Engine(EngineConfig(model=plan["model"], dtype=plan["dtype"], **plan["engine"]))
    result["load_s"] = time.perf_counter() - start
    result["memory"] = sampler.report()
    result["threads"] = torch.get_num_threads()
    result["affinity"] = sorted(os.sched_getaffinity(0))
    vocab = engine.runner.model.config.vocab_size
    if engine.tp.is_driver:
        try:
            result["decode"] = []
            for b in plan.get("decode_batches", []):
                result["decode"].append(
                    workload.run_engine_decode(
                        engine, b, plan["decode_prompt"], plan["decode_tokens"], vocab
                    )
                )
                progress(f"engine decode batch {b}: {result['decode'][-1]['tok_s']:.2f} tok/s")
            if plan.get("workload"):
                result["workload"] = workload.run_engine(engine, plan["workload"], vocab)
        finally:
            engine.shutdown()
    else:
        engine.run_follower()
    timing.barrier()


def main(plan_path: str) -> None:
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from benchmarks import breakdown, timing
    from benchmarks.memory import PeakSampler

    plan = json.loads(Path(plan_path).read_text())
    rank = _rank()
    result: dict[str, Any] = {"config": plan["config"], "rank": rank, "plan": plan}
    if plan["impl"] == "dstp_engine":
        run_engine(plan, result)
        _finish(plan, result, rank)
        return
    start = time.perf_counter()
    with PeakSampler() as sampler:
        model, tp = load(plan)
    result["load_s"] = time.perf_counter() - start
    result["memory"] = sampler.report()
    result["threads"] = torch.get_num_threads()
    result["affinity"] = sorted(os.sched_getaffinity(0))
    if tp is not None:
        result["fast_all_reduce"] = tp.fast_all_reduce
    result["kernels"] = kernels(plan["impl"])  # before any phase: partial results have it too
    PARTIAL.update(result)
    result = PARTIAL
    vocab = model.config.vocab_size
    timing.barrier()

    progress(f"loaded in {result['load_s']:.1f}s")
    if plan.get("prefill"):
        timing.prefill(model, 16, vocab, 1, 0)  # warm-up
        result["prefill"] = []
        for n in plan["prefill"]:
            result["prefill"].append(
                timing.prefill(model, n, vocab, plan["prefill_repeats"], plan["prefill_budget_s"])
            )
            progress(f"prefill {n}: {result['prefill'][-1]['median_s']:.3f}s")
    result["decode"] = []
    result["lm_head_copy_bytes_per_row"] = copy = timing.lm_head_copy_bytes(model)
    progress(f"LM-head probe: {copy / 1e6:.0f} MB weight copy per sequence")  # its own peak
    for b in plan.get("decode_batches", []):
        if _skip_for_lm_head_copies(result, copy, b, f"decode batch {b}"):
            continue
        result["decode"].append(
            timing.decode(model, b, plan["decode_prompt"], plan["decode_tokens"], vocab)
        )
        progress(f"decode batch {b}: {result['decode'][-1]['tok_s']:.2f} tok/s")
    if plan.get("breakdown") and tp is not None:
        result["breakdown"] = breakdown.run(model, tp, vocab, **plan["breakdown"])
        progress("breakdown")
    if plan.get("workload"):
        from benchmarks import workload

        batch = plan["workload"].get("static_batch", 16)
        if not _skip_for_lm_head_copies(
            result, copy, batch, f"workload (static batches of {batch})"
        ):
            result["workload"] = workload.run_static(model, plan["workload"], vocab)
            progress(f"workload: {result['workload']['output_tok_s']:.2f} tok/s")
    _finish(plan, result, rank)


def _skip_for_lm_head_copies(result: dict, copy_per_row: int, rows: int, what: str) -> bool:
    """True (noted in ``result``) when the LM head's per-sequence weight copies would not fit."""
    from benchmarks import timing

    need = copy_per_row * rows * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not timing.agreed(need > 0.5 * psutil.virtual_memory().available):
        return False
    result.setdefault("skipped", []).append(
        f"{what}: the LM head would copy its weight per sequence "
        f"({need / 1e9:.1f} GB over this host's ranks; see timing.lm_head_copy_bytes)"
    )
    progress(f"{what}: skipped, {need / 1e9:.1f} GB LM-head weight copies")
    return True


def kernels(impl: str) -> dict[str, str]:
    """Which CPU kernel ``impl`` ran for a bf16 linear of one, a few and many rows."""
    if impl not in ("dstp", "dstp_engine"):
        return {"one_row": "PyTorch F.linear", "2+ rows": "PyTorch F.linear (oneDNN)"}
    from dstp.cpu import kernels as cpu_kernels

    return cpu_kernels.describe_paths()


def _finish(plan: dict, result: dict, rank: int) -> None:
    from benchmarks import timing

    result.setdefault("kernels", kernels(plan["impl"]))
    result["memory"]["phase_peaks_gb"] = PHASE_PEAKS
    result["complete"] = True
    _write(result)
    timing.barrier()
    print(f"rank {rank}: {plan['config']} done", flush=True)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
