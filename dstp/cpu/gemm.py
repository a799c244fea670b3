"""Multi-row bf16 linears (prefill, batched decode) at fp32 speed on CPUs without bf16 dots.

Without AVX512-BF16 or AMX, oneDNN's bf16 GEMM runs several times slower than
fp32 GEMM at the same work (benchmarks/FINDINGS.md). Here the weight stays
bf16 in memory and is widened to fp32 a block of output rows at a time, into
one small reused buffer that stays in cache, and each block is one fp32 GEMM.
The sums are fp32 and rounded to bf16 once, as oneDNN's bf16 GEMM does, so the
two agree within bf16 rounding.

``--cpu-compute-dtype``: "auto" widens where the CPU has no bf16 dot product,
"float32" always, "bfloat16" never (oneDNN's bf16 GEMM everywhere).
"""

from __future__ import annotations

import threading

import torch

from dstp.cpu import features as cpu_features

COMPUTE_DTYPES = ("auto", "bfloat16", "float32")
TILE_BYTES = 2 << 20  # one widened fp32 block of weight rows (benchmarks/FINDINGS.md)
MIN_ROWS = 56  # below, widening costs more (cpu_kernels' few-row kernel takes 2-55 rows)

_setting = "auto"
_buffers = threading.local()


def set_compute_dtype(name: str) -> None:
    """Chooses how multi-row bf16 linears compute (``--cpu-compute-dtype``)."""
    global _setting
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"--cpu-compute-dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
    _setting = name


def computes_in_fp32() -> bool:
    """Whether bf16 linears of two or more rows on CPU compute in fp32 on widened weights
    (the setting, and for "auto" the CPU's lack of a bf16 dot product)."""
    if _setting == "auto":
        return not cpu_features.has_native_bf16_dot()
    return _setting == "float32"


def widens(rows: int) -> bool:
    """Whether a bf16 linear of ``rows`` rows on CPU takes :func:`widened_linear`."""
    return rows >= MIN_ROWS and computes_in_fp32()


def describe() -> str:
    """The multi-row path in use, for start-up logs and benchmark records."""
    if computes_in_fp32():
        why = "asked for" if _setting == "float32" else "no bf16 dot product on this CPU"
        return f"fp32 on widened bf16 weight blocks ({why})"
    return "oneDNN bf16 GEMM"


def widened_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a 2-D bf16 ``x``, computed in fp32 block by block."""
    rows, k = weight.shape
    step = max(1, min(rows, TILE_BYTES // (4 * k)))
    block = _block_buffer(step * k).view(step, k)
    x32 = x.float()
    out = torch.empty(x.shape[0], rows, dtype=torch.float32)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        widened = block[: stop - start]
        widened.copy_(weight[start:stop])
        torch.mm(x32, widened.t(), out=out[:, start:stop])
    if bias is not None:
        out += bias
    return out.to(x.dtype)


def _block_buffer(numel: int) -> torch.Tensor:
    """This thread's fp32 block buffer, grown when a wider weight needs it."""
    buffer = getattr(_buffers, "block", None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=torch.float32)
        _buffers.block = buffer
    return buffer[:numel]
