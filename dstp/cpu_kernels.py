"""dstp's own CPU kernels, compiled on first use (the way DeepSpeed builds its CPU ops).

Only where they beat PyTorch's: a single-row bf16 GEMV for CPUs with
AVX512-BF16 (batch-1 decode; see ``csrc/gemv_bf16.cpp``). Anything else, a
CPU without the instructions, no compiler, or ``DSTP_CPU_KERNELS=0`` falls
back to PyTorch, with one log line saying why.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("dstp")

SOURCE = Path(__file__).with_name("csrc") / "gemv_bf16.cpp"
ENV_SWITCH = "DSTP_CPU_KERNELS"


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in info)
    except OSError:
        return False


@functools.cache
def _ops() -> ModuleType | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if not _cpu_has_avx512_bf16():
        log.info("no AVX512-BF16 on this CPU: single-row bf16 linears use PyTorch's kernel")
        return None
    try:
        from torch.utils.cpp_extension import load

        start = time.perf_counter()
        ops = load(name="dstp_cpu_kernels", sources=[str(SOURCE)], extra_cflags=["-O3"])
        log.info(
            "dstp's AVX512-BF16 GEMV is ready for batch-1 decode (%.1f s; built once, then cached)",
            time.perf_counter() - start,
        )
        return ops
    except Exception as exc:  # no compiler, old compiler, no ninja: PyTorch's kernel still works
        log.warning(
            "could not build dstp's CPU kernels (%s); single-row bf16 linears use PyTorch's "
            "kernel. Install a C++ compiler and ninja, or set %s=0 to silence this.",
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            ENV_SWITCH,
        )
        return None


def available() -> bool:
    """Whether the kernels are built (building them now if this is the first call)."""
    return _ops() is not None


def gemv_bf16(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``F.linear`` for one contiguous bf16 row ``[1, K]`` on CPU, or None when unavailable."""
    ops = _ops()
    return None if ops is None else ops.gemv_bf16(x, weight, bias)
