"""The machine a benchmark ran on and its limits: memory bandwidth, GEMM peaks.

Batch-1 decode reads every weight once per token, so on a CPU its ceiling is
``bandwidth / weight bytes``. Two stream-like tests, each the best of a few
repeats over buffers far larger than the last-level cache:

* ``read``: ``torch.sum`` of a float32 buffer (what a GEMV does to weights);
* ``copy``: ``dst.copy_(src)``, counted as read + write bytes (STREAM "copy").

Run in a fresh process per thread count, so the torch thread pool is sized
as asked and nothing else of the harness is resident.

Prefill and batched work are bounded by compute instead: :func:`gemm_peaks`
times one GEMM shape per compute type (oneDNN bf16, fp32, and dstp's bf16
widened to fp32) in one pinned process per TP rank; the best is the limit.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time


def machine() -> dict[str, object]:
    """CPU model, core count and memory, as lscpu / /proc report them."""
    info: dict[str, object] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("Model name", "?")
        info["cpus"] = int(fields.get("CPU(s)", "0"))
        flags = fields.get("Flags", "").split()
        info["isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
        info["hypervisor"] = fields.get("Hypervisor vendor", "none")
    except (OSError, subprocess.CalledProcessError):
        info["cpu"] = platform.processor()
        info["cpus"] = os.cpu_count()
    try:
        import psutil

        info["mem_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_avg_1m"] = os.getloadavg()[0]
    except ImportError:
        pass
    import torch

    info["torch"] = torch.__version__
    return info


def _measure(threads: int, mib: int, repeats: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault all pages in before timing
    read, copy = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        src.sum()
        read.append(time.perf_counter() - t)
        t = time.perf_counter()
        dst.copy_(src)
        copy.append(time.perf_counter() - t)
    nbytes = n * 4
    return {
        "threads": threads,
        "read_gbs": nbytes / min(read) / 1e9,
        "copy_gbs": 2 * nbytes / min(copy) / 1e9,
    }


def bandwidth(threads: int, mib: int = 1024, repeats: int = 6) -> dict[str, float]:
    """Memory bandwidth with ``threads`` torch threads, measured in a child process."""
    code = (
        "import json,sys; sys.path.insert(0, sys.argv[1]);"
        "from benchmarks.sysinfo import _measure;"
        f"print(json.dumps(_measure({threads}, {mib}, {repeats})))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code, root], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _stream(core: int, mib: int, start_at: float, seconds: float) -> int:
    """Bytes one single-threaded process pinned to ``core`` reads in ``seconds`` from ``start_at``."""
    import torch

    _pin(core)
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    time.sleep(max(0.0, start_at - time.time()))
    done, end = 0, time.time() + seconds
    while time.time() < end:
        src.sum()
        done += src.numel() * 4
    return done


def bandwidth_pinned(processes: int, mib: int = 512, seconds: float = 3.0) -> dict[str, float]:
    """Read bandwidth of ``processes`` pinned single-thread processes streaming at once.

    This is how TP ranks read weights (one pinned process per core), and it can
    exceed what one process's threads reach with ``torch.sum``.
    """
    start_at = time.time() + 3.0  # after every child has faulted its buffer in
    total = sum(_run_pinned(processes, f"_stream({{core}}, {mib}, {start_at}, {seconds})"))
    return {"processes": processes, "read_gbs": total / seconds / 1e9}


def _pin(core: int) -> None:
    """This process on ``core`` alone, with one torch thread (how a TP rank runs)."""
    import torch

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)


def _run_pinned(processes: int, call: str) -> list[float]:
    """Runs ``call`` (a call of this module's, ``{core}`` filled in) in ``processes``
    children at once, one per core, and returns what each printed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    children = []
    for i in range(processes):
        core = cores[i % len(cores)] if cores else i
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]);"
            f"from benchmarks import sysinfo; print(sysinfo.{call.format(core=core)})"
        )
        children.append(
            subprocess.Popen([sys.executable, "-c", code, root], stdout=subprocess.PIPE, text=True)
        )
    return [float(c.communicate()[0].strip().splitlines()[-1]) for c in children]


# GEMM shape of the peak test: a 512-token prefill through a 1B model's MLP shard at TP=2
GEMM_SHAPE = (512, 4096, 2048)  # tokens, output features, input features
# oneDNN's GEMMs, dstp's widening GEMM, and dstp's AMX GEMM where the CPU, build and OS have
# it (0 elsewhere, and left out): the limit is the fastest, whoever's it is
AMX_TYPE = "bf16 dstp AMX"
COMPUTE_TYPES = ("bf16", "fp32", "bf16 widened to fp32", AMX_TYPE)


def _gemm(core: int, kind: str, seconds: float) -> float:
    """GFLOP/s of one pinned single-thread process running ``kind`` GEMMs for ``seconds``: the
    median call (issue 22's decision: a sustained rate, not one lucky call)."""
    import torch
    import torch.nn.functional as F

    from dstp.cpu import gemm as cpu_gemm
    from dstp.cpu import kernels as cpu_kernels

    if kind == AMX_TYPE and not cpu_kernels.amx_gemm_ready():
        return 0.0
    _pin(core)
    m, n, k = GEMM_SHAPE
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    run = {
        "bf16 widened to fp32": lambda: cpu_gemm.widened_linear(x, w),
        AMX_TYPE: lambda: cpu_kernels.gemm_amx_bf16(x, w),
    }.get(kind, lambda: F.linear(x, w))
    run()
    calls, end = [], time.time() + seconds
    while time.time() < end:
        t = time.perf_counter()
        run()
        calls.append(time.perf_counter() - t)
    return 2 * m * n * k / statistics.median(calls) / 1e9


def gemm_peaks(processes: int, seconds: float = 4.0) -> dict[str, float]:
    """Aggregate GFLOP/s of ``processes`` pinned single-thread processes (one per TP rank)
    for each compute type, run one type at a time; ``best`` is the fastest type's."""
    peaks = {
        kind: sum(_run_pinned(processes, f"_gemm({{core}}, {kind!r}, {seconds})"))
        for kind in COMPUTE_TYPES
    }
    peaks = {kind: rate for kind, rate in peaks.items() if rate > 0}
    peaks["best"] = max(peaks.values())
    return {"processes": processes, "shape": list(GEMM_SHAPE), **peaks}


def gemm_limit(start: dict, end: dict) -> float:
    """The machine's compute limit for a run: the median of the fastest type's rate measured
    at its start and at its end (the neighbours' load moves it; issue 22's decision)."""
    return statistics.median([start["best"], end["best"]])


if __name__ == "__main__":
    print(
        json.dumps(
            {"machine": machine(), "bw": [bandwidth(1), bandwidth(2)], "gemm": gemm_peaks(2)},
            indent=1,
        )
    )
