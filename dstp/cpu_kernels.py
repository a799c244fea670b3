"""dstp's own CPU kernels, compiled on first use (the way DeepSpeed builds its CPU ops).

Only where they beat PyTorch's: a single-row bf16 GEMV for CPUs with
AVX512-BF16 (batch-1 decode; see ``csrc/gemv_bf16.cpp``). Anything else, a
CPU without the instructions, no compiler, or ``DSTP_CPU_KERNELS=0`` falls
back to PyTorch, with one log line saying why. :func:`linear_2d` is the
dispatch every TP layer calls: this kernel, ATen's GEMV, or ``F.linear``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

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


def linear_2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` on a flattened input, with the faster CPU kernel for one row.

    - For a strided 3-D view (HF's ``hidden[:, -1:, :]``) and a weight that
      does not require grad, ``matmul`` takes its bmm path, which copies the
      transposed weight once per batch row: 263 MB per sequence for a 1B
      model's LM-head shard, seconds per prefill. A 2-D input is one GEMM.
    - For a single bf16 row on CPU (batch-1 decode), oneDNN's GEMV streams
      about half the memory bandwidth of ATen's own kernel (8192x2048, one
      thread: 2.8 vs 1.5 ms), and dstp's four-stream kernel about 1.3x ATen's;
      from two rows on oneDNN is faster.
    """
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 1 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
        out = _single_row_bf16(flat, weight, bias)
    else:
        out = F.linear(flat, weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def _single_row_bf16(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """dstp's streaming GEMV when built (see gemv_bf16), else ATen's (not oneDNN's)."""
    if not (torch.is_grad_enabled() and weight.requires_grad):  # the kernel has no backward
        bias_ok = bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous())
        if weight.is_contiguous() and bias_ok:
            out = gemv_bf16(x.contiguous(), weight, bias)
            if out is not None:
                return out
    with _aten_cpu_kernels():
        return F.linear(x, weight, bias)


@contextlib.contextmanager
def _aten_cpu_kernels() -> Iterator[None]:
    """oneDNN off for the enclosed ops (thread-local enough: one engine thread per process)."""
    previous = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(previous)
