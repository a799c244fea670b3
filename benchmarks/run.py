"""dstp benchmark harness: one command, every configuration, one table.

    python benchmarks/run.py            # Llama-3.2-1B shape, bf16 (~15 min)
    python benchmarks/run.py --small    # ~30M-parameter model, quick check
    python benchmarks/run.py --model PATH --configs dstp,hf

It generates (once, cached under runs/bench/models, git-ignored) or takes a
checkpoint, measures the machine's memory bandwidth, then runs each
configuration alone, one after another (never two models' ranks at once):

    dstp         dstp.load at TP=2 + HF generate: memory, prefill, decode, breakdown
    dstp_engine  dstp's continuous-batching engine at TP=2 (what the server runs):
                 decode at each batch size, the 64-request workload
    hf           HF from_pretrained, one process, all cores: memory, prefill, decode,
                 workload with static batches
    ds_autotp    DeepSpeed init_inference AutoTP at TP=2 + HF generate: same as hf
    hf_1thread   (extra) HF with one thread: a TP=2 rank's compute budget
    dstp_gloo    (extra) dstp with DSTP_FAST_ALLREDUCE=0 (gloo): prefill 128, decode b1
    dstp_aten_gemv (extra) dstp with DSTP_CPU_KERNELS=0 (ATen's GEMV): decode b1
    dstp_avx2_gemv (extra) dstp with DSTP_CPU_KERNEL=avx2 (the AVX2 build on an AVX512
                 CPU, this memory system's figure for AVX2-only hosts): decode b1

Results: <out>/results.json and <out>/results.md (default out: runs/bench/latest),
plus per-rank JSON and logs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import checkpoint, report, sysinfo  # noqa: E402
from benchmarks.launch import REPO, run_config  # noqa: E402

DEFAULT_CONFIGS = ("dstp", "dstp_engine", "hf", "ds_autotp")
EXTRA_CONFIGS = ("hf_1thread", "dstp_gloo", "dstp_aten_gemv", "dstp_avx2_gemv")


def build_plans(args: argparse.Namespace, model: Path, out: Path) -> list[tuple[dict, int, dict]]:
    """(plan, ranks, extra env) per configuration, in run order."""
    small = args.small
    base = {
        "model": str(model),
        "dtype": "bfloat16",
        "out": str(out),
        "prefill": [128, 1024],
        "prefill_repeats": 5 if small else 3,
        "prefill_budget_s": 20.0,
        "decode_batches": args.decode_batches,
        "decode_prompt": 32,
        "decode_tokens": 16 if small else args.decode_tokens,
    }
    work = {
        "num_requests": args.requests,
        "prompt_len": [32, 512],
        "output_len": [16, 32] if small else [64, 128],
        "static_batch": args.static_batch,
        "budget_s": args.workload_budget,
        "seed": 0,
    }
    breakdown = {"prefill_len": 128, "steps": 8 if small else 16}
    plans = {
        "dstp": ({**base, "breakdown": breakdown}, args.tp, {}),
        "dstp_engine": (
            {
                **base,
                "impl": "dstp_engine",
                "workload": work,
                "engine": {
                    "max_num_seqs": 64,
                    "kv_cache_memory_gib": 1.0,
                    **(
                        {"max_num_batched_tokens": args.engine_batched_tokens}
                        if args.engine_batched_tokens
                        else {}
                    ),
                },
            },
            args.tp,
            {},
        ),
        "hf": ({**base, "workload": work}, 1, {}),
        "ds_autotp": ({**base, "workload": work}, args.tp, {}),
        "hf_1thread": ({**base, "impl": "hf", "threads": 1, "decode_batches": [1]}, 1, {}),
        "dstp_aten_gemv": (
            {**base, "impl": "dstp", "prefill": [], "decode_batches": [1]},
            args.tp,
            {"DSTP_CPU_KERNELS": "0"},
        ),
        "dstp_avx2_gemv": (
            {**base, "impl": "dstp", "prefill": [], "decode_batches": [1]},
            args.tp,
            {"DSTP_CPU_KERNEL": "avx2"},
        ),
        "dstp_gloo": (
            {**base, "impl": "dstp", "prefill": [128], "decode_batches": [1]},
            args.tp,
            {"DSTP_FAST_ALLREDUCE": "0"},
        ),
    }
    chosen = []
    for name in args.configs.split(","):
        if name not in plans:
            raise SystemExit(f"unknown config {name!r}; choose from {sorted(plans)}")
        plan, ranks, env = plans[name]
        plan = {"impl": name, **plan, "config": name}
        if args.no_workload:
            plan.pop("workload", None)
        if args.no_breakdown:
            plan.pop("breakdown", None)
        chosen.append((plan, ranks, env))
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--small", action="store_true", help="~30M-parameter model for quick checks")
    p.add_argument("--model", type=Path, help="an existing HF safetensors checkpoint folder")
    p.add_argument("--models-dir", type=Path, default=REPO / "runs" / "bench" / "models")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "latest")
    p.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma list of {DEFAULT_CONFIGS + EXTRA_CONFIGS}",
    )
    p.add_argument("--extras", action="store_true", help=f"also run {EXTRA_CONFIGS}")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument(
        "--decode-batches",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 8, 32],
        help="comma list of decode batch sizes",
    )
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--static-batch", type=int, default=16)
    p.add_argument(
        "--workload-budget",
        type=float,
        default=300.0,
        help="seconds after which a static-batch run stops (partial figures)",
    )
    p.add_argument(
        "--engine-batched-tokens",
        type=int,
        default=None,
        help="the engine's max_num_batched_tokens (default: the engine's own)",
    )
    p.add_argument("--no-workload", action="store_true")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--timeout", type=float, default=1200.0, help="per configuration")
    args = p.parse_args(argv)
    if args.extras:
        args.configs += "," + ",".join(EXTRA_CONFIGS)
    if args.small:
        args.requests = min(args.requests, 16)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("*.rank*.json"):
        stale.unlink()
    if args.model:
        model = args.model
    else:
        shape = checkpoint.SMALL if args.small else checkpoint.LLAMA_1B
        t = time.perf_counter()
        model = checkpoint.ensure_checkpoint(args.models_dir, shape)
        print(f"checkpoint: {model} ({time.perf_counter() - t:.1f}s)")
    sizes = checkpoint.weight_bytes(model)
    ckpt_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    machine = sysinfo.machine()
    print(
        f"machine: {machine.get('cpu')}, {machine.get('cpus')} cores, load {machine.get('load_avg_1m'):.2f}"
    )
    bw2 = sysinfo.bandwidth(os.cpu_count() or 1)
    bw1 = sysinfo.bandwidth(1)
    pinned = sysinfo.bandwidth_pinned(args.tp)
    gemm = sysinfo.gemm_peaks(args.tp)
    print(
        f"GEMM peak ({args.tp} pinned processes): "
        + ", ".join(f"{k} {gemm[k]:.1f}" for k in (*sysinfo.COMPUTE_TYPES, "best") if k in gemm)
        + " GFLOP/s"
    )
    print(
        f"bandwidth: read {bw2['read_gbs']:.1f} GB/s, copy {bw2['copy_gbs']:.1f} GB/s ({bw2['threads']} threads); "
        f"read {pinned['read_gbs']:.1f} GB/s ({args.tp} pinned single-thread processes)"
    )

    failed = []
    for plan, ranks, env in build_plans(args, model, args.out):
        t = time.perf_counter()
        print(f"running {plan['config']} ({ranks} rank(s)) ...", flush=True)
        if run_config(plan, ranks, args.timeout, env):
            failed.append(plan["config"])
        print(f"  {plan['config']}: {time.perf_counter() - t:.0f}s", flush=True)

    # bandwidth swings with the neighbours' load: the best of start and end is the ceiling
    end = sysinfo.bandwidth(os.cpu_count() or 1)
    if end["read_gbs"] > bw2["read_gbs"]:
        bw2 = end
    end_pinned = sysinfo.bandwidth_pinned(args.tp)
    if end_pinned["read_gbs"] > pinned["read_gbs"]:
        pinned = end_pinned
    gemm_end = sysinfo.gemm_peaks(args.tp)
    gemm = {**gemm, "end": gemm_end, "limit": sysinfo.gemm_limit(gemm, gemm_end)}
    results = report.load_results(args.out)
    table = report.comparison(results, [128, 1024], args.decode_batches)
    ceiling_gbs = max(bw2["read_gbs"], pinned["read_gbs"])
    roof = report.roofline(results, sizes["decode_bytes_per_step"], ceiling_gbs)
    lim = report.limits(
        results, sizes, ceiling_gbs, gemm["limit"], [128, 1024], args.decode_batches
    )
    summary = {
        "machine": machine,
        "bandwidth": bw2,
        "bandwidth_1t": bw1,
        "bandwidth_pinned": pinned,
        "checkpoint": str(model.relative_to(REPO) if model.is_relative_to(REPO) else model),
        "checkpoint_bytes": ckpt_bytes,
        "tp": args.tp,
        "hf_threads": os.cpu_count(),
        "table": table,
        "roofline": roof,
        "gemm_peaks": gemm,
        "limits": lim,
        "targets": report.targets(table, roof, ckpt_bytes, results, lim),
        "memory_detail": report.memory_detail(results),
        "failed": failed,
    }
    md = (
        report.markdown(summary)
        + report.limits_markdown(summary)
        + report.all_configs_markdown(results, [128, 1024], args.decode_batches)
        + report.breakdown_markdown(results)
    )
    (args.out / "results.json").write_text(json.dumps({**summary, "raw": results}, indent=1))
    (args.out / "results.md").write_text(md)
    print()
    print(md)
    if failed:
        print(f"FAILED: {failed} (logs in {args.out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
