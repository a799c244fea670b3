"""Batch-1 decode GEMV micro-benchmark: GB/s of weight bytes read, one thread.

Compares, for the weight shapes of a 1B Llama shard ``[N, K]`` (bf16):

* ``dstp``: the GEMV dstp picked for this CPU (``cpu_kernels.kernel()``:
  ``avx512_bf16`` or ``avx2``; ``DSTP_CPU_KERNEL=avx2`` forces the AVX2 one);
* ``aten``: ATen's bf16 GEMV, ``F.linear`` on a 1-row input with oneDNN off
  (dstp's fallback);
* ``onednn``: plain ``F.linear`` on a 1-row input (oneDNN's GEMV);

against a read roofline: ``torch.sum`` over a 256 MiB bf16 tensor (and, for
reference, over a 256 MiB float32 one).

Decode streams every weight from DRAM once per token, so each timed run is one
pass over enough copies of the weight to far exceed the last-level cache
(``--pass-mib``, 512 MiB by default); the GB/s is bytes of weight over the time
of a pass, and each number is the best of ``--repeats`` passes (5).

    python benchmarks/gemv.py [--json out.json]

``--rows 2,4,8,16,32,48`` times the few-row case instead (batched decode, x ``[M, K]``) on
the shapes of the 1B model at TP=2 (``FEW_SHAPES``), one thread, the median of
``--repeats`` passes, interleaved: ``dstp`` is the chosen build's ``gemm_few_bf16`` (on the
AVX512-BF16 build its two variants instead, ``dpbf16``: vdpbf16ps, and ``fma``:
``gemm_few_bf16_fma``, fp32 FMAs on weights widened in registers), ``avx2`` the AVX2
build's beside it on an AVX512-BF16 CPU (``--no-avx2`` leaves it out), ``gemm`` dstp's
widening GEMM (``gemm_widened_bf16``, what takes over from the few-row kernels), ``blocks``
MKL's sgemm on widened weight blocks (its fallback), ``onednn`` plain ``F.linear`` (oneDNN's
bf16 GEMM), ``amx`` dstp's AMX GEMM on the plain weights (``gemm_amx_bf16``, where the CPU, build
and OS have AMX tiles), ``aten`` ``F.linear`` with oneDNN off; GB/s of weight read and GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
import torch.nn.functional as F

from dstp.cpu import features as cpu_features
from dstp.cpu import gemm as cpu_gemm
from dstp.cpu import kernels as cpu_kernels
from dstp.cpu.kernels import _aten_cpu_kernels

SHAPES = [(2048, 2048), (8192, 2048), (2048, 8192), (64128, 2048)]  # [N, K]: out x in
# a 1B Llama's linears at TP=2, [N, K]: qkv, gate_up, down, the LM head's shard
FEW_SHAPES = [(1536, 2048), (8192, 2048), (2048, 4096), (64128, 2048)]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (first touch, lazy init)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def roofline(dtype: torch.dtype, mib: int, repeats: int) -> float:
    """GB/s of a plain streaming read: torch.sum over ``mib`` MiB of ``dtype``."""
    t = torch.ones(mib * 2**20 // torch.tensor([], dtype=dtype).element_size(), dtype=dtype)
    return t.numel() * t.element_size() / best_of(lambda: t.sum(), repeats) / 1e9


def gemv_rates(n: int, k: int, pass_mib: int, repeats: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    nbytes = n * k * 2
    copies = max(1, math.ceil(pass_mib * 2**20 / nbytes))
    weights = [torch.randn(n, k, generator=gen).bfloat16() for _ in range(copies)]
    x = torch.randn(1, k, generator=gen).bfloat16()

    def one_pass(linear):
        def run():
            for w in weights:
                linear(x, w)

        return copies * nbytes / best_of(run, repeats) / 1e9

    def aten(x, w):
        with _aten_cpu_kernels():
            return F.linear(x, w)

    rates = {}
    if cpu_kernels.available():
        rates["dstp"] = one_pass(cpu_kernels.gemv_bf16)
    rates["aten"] = one_pass(aten)
    rates["onednn"] = one_pass(F.linear)
    return rates


def few_row_rates(
    n: int, k: int, rows: list[int], pass_mib: int, repeats: int, with_avx2: bool = True
) -> dict[int, dict[str, tuple[float, float]]]:
    """{M: {path: (GB/s of weight, GFLOP/s)}} for x [M, K] against copies of W [N, K]: the
    median pass of each path, the paths' passes interleaved (this VM's noise hits all)."""
    gen = torch.Generator().manual_seed(0)
    nbytes = n * k * 2
    copies = max(1, math.ceil(pass_mib * 2**20 / nbytes))
    weights = [torch.randn(n, k, generator=gen).bfloat16() for _ in range(copies)]

    def aten(x, w, bias):
        with _aten_cpu_kernels():
            return F.linear(x, w, bias)

    paths = {}
    ops = cpu_kernels._ops()
    if getattr(ops, "gemm_few_bf16_fma", None) is not None:  # the AVX512-BF16 build's two
        paths["dpbf16"] = ops.gemm_few_bf16
        paths["fma"] = ops.gemm_few_bf16_fma
    elif getattr(ops, "gemm_few_bf16", None) is not None:
        paths["dstp"] = ops.gemm_few_bf16
    if cpu_kernels.kernel() == "avx512_bf16" and cpu_features.has_avx2_fma() and with_avx2:
        avx2 = cpu_kernels._build("avx2")  # the AVX2 build, loaded beside the chosen one
        if avx2 is not None:
            paths["avx2"] = avx2.gemm_few_bf16
    if getattr(ops, "gemm_widened_bf16", None) is not None:
        paths["gemm"] = ops.gemm_widened_bf16
    if getattr(ops, "amx_ready", False) and n % 16 == 0 and k % 32 == 0:
        paths["amx"] = ops.gemm_amx_bf16
    paths.update(blocks=cpu_gemm._widened_blocks, onednn=F.linear, aten=aten)
    out: dict[int, dict[str, tuple[float, float]]] = {}
    for m in rows:
        x = torch.randn(m, k, generator=gen).bfloat16()
        times: dict[str, list[float]] = {name: [] for name in paths}
        for repeat in range(repeats + 1):  # the first round warms up
            for name, linear in paths.items():
                start = time.perf_counter()
                for w in weights:
                    linear(x, w, None)
                if repeat:
                    times[name].append(time.perf_counter() - start)
        out[m] = {}
        for name, passes in times.items():
            seconds = sorted(passes)[len(passes) // 2]
            out[m][name] = (copies * nbytes / seconds / 1e9, copies * 2 * m * n * k / seconds / 1e9)
    return out


def main_few_rows(args) -> None:
    rows = [int(r) for r in args.rows.split(",")]
    kernel = cpu_kernels.kernel()
    print(
        f"CPU: {cpu_model()}; {args.threads} thread(s); dstp kernel: {kernel}; "
        f"median of {args.repeats} passes of >= {args.pass_mib} MiB"
    )
    names = ("dstp", "dpbf16", "fma", "avx2", "gemm", "amx", "blocks", "onednn", "aten")
    if kernel == "avx512_bf16":
        names = names[1:]  # its two variants, not the one settle_few_rows chose
    if args.no_avx2:
        names = tuple(name for name in names if name != "avx2")
    print(
        f"{'N x K':>12} {'M':>3}  "
        + "  ".join(f"{p:>15}" for p in names)
        + "   GB/s of weights / GFLOP/s"
    )
    result: dict[str, object] = {"cpu": cpu_model(), "kernel": kernel, "shapes": {}}
    for n, k in FEW_SHAPES:
        rates = few_row_rates(n, k, rows, args.pass_mib, args.repeats, not args.no_avx2)
        result["shapes"][f"{n}x{k}"] = rates
        for m, by_path in rates.items():
            cells = [
                f"{by_path[p][0]:5.1f} / {by_path[p][1]:5.1f}" if p in by_path else "-"
                for p in names
            ]
            print(f"{f'{n}x{k}':>12} {m:>3}  " + "  ".join(f"{c:>15}" for c in cells), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pass-mib", type=int, default=512)
    parser.add_argument("--roofline-mib", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--no-avx2", action="store_true", help="--rows: not the AVX2 build")
    parser.add_argument("--rows", help="the few-row case at these M (comma-separated)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rows:
        main_few_rows(args)
        return

    kernel = cpu_kernels.kernel()
    result: dict[str, object] = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "kernel": kernel or "none (PyTorch)",
        "torch": torch.__version__,
        "roofline_bf16_sum_GBps": roofline(torch.bfloat16, args.roofline_mib, args.repeats),
        "roofline_fp32_sum_GBps": roofline(torch.float32, args.roofline_mib, args.repeats),
        "shapes": {},
    }
    roof = result["roofline_bf16_sum_GBps"]
    print(f"CPU: {result['cpu']}; {args.threads} thread(s); dstp kernel: {result['kernel']}")
    print(
        f"read roofline (torch.sum, {args.roofline_mib} MiB): bf16 {roof:.1f} GB/s, "
        f"fp32 {result['roofline_fp32_sum_GBps']:.1f} GB/s; best of {args.repeats}"
    )
    print(f"{'N x K':>12} {'dstp':>12} {'ATen':>12} {'oneDNN':>12}   GB/s of weights (x roofline)")
    for n, k in SHAPES:
        rates = gemv_rates(n, k, args.pass_mib, args.repeats)
        result["shapes"][f"{n}x{k}"] = rates
        cells = [
            f"{rates[name]:5.1f} ({rates[name] / roof:4.0%})" if name in rates else "-"
            for name in ("dstp", "aten", "onednn")
        ]
        print(f"{f'{n}x{k}':>12} " + " ".join(f"{c:>12}" for c in cells))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
