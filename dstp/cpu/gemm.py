"""Multi-row bf16 linears (prefill, batched decode) at fp32 speed on CPUs without bf16 dots.

Without AVX512-BF16 or AMX, oneDNN's bf16 GEMM runs several times slower than
fp32 GEMM at the same work (benchmarks/FINDINGS.md). Here the weight stays
bf16 in memory and is widened to fp32 as it is packed: dstp's GEMM
(csrc/gemm_widened.cpp) widens each panel of weight rows into L1, where every
tile of x meets it. Without dstp's kernels, each block of weight rows is widened
into one small reused buffer and multiplied by MKL's fp32 GEMM (the weight then
crosses memory three times, so that path starts at ``MIN_ROWS``). The sums are
fp32 and rounded to bf16 once, as oneDNN's bf16 GEMM does, so the two agree
within bf16 rounding.

``--cpu-compute-dtype``: "auto" widens where the CPU has no bf16 dot product and,
where it has one, if :func:`settle` measured widening faster on this machine (a
bf16 dot product does not make oneDNN's bf16 GEMM fast: on a KVM Xeon with
AVX512-BF16 and its AMX hidden it ran at 0.61x fp32's rate, benchmarks/FINDINGS.md);
"float32" always widens, "bfloat16" never does (oneDNN's bf16 GEMM everywhere).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dstp.cpu import features as cpu_features

COMPUTE_DTYPES = ("auto", "bfloat16", "float32")
TILE_BYTES = 4 << 20  # one widened fp32 block of weight rows (benchmarks/FINDINGS.md)
MIN_ROWS = 56  # without dstp's GEMM: below, widening costs more (see also kernels.few_row_limit)
# "auto" widens only if it measures this much faster: a near tie keeps oneDNN's bf16 GEMM,
# so the choice does not flip between runs of the same machine
MEASURED_MARGIN = 1.1
PROBE_SHAPE = (256, 2048, 2048)  # rows, in, out: a prefill-sized linear, ~2 GFLOP
WIDENING_PROBE_ROWS = (64, 256)  # dstp's GEMM against MKL's: a decode batch, a prefill chunk

log = logging.getLogger("dstp")

_setting = "auto"
_measured_fp32: bool | None = None  # "auto"'s measured choice, once settle() ran
_blocks_faster = False  # settle() timed MKL's widened blocks faster than dstp's GEMM here
_widening_timed = False  # once per process: the machine, not the setting, decides it
_buffers = threading.local()


def set_compute_dtype(name: str) -> None:
    """Chooses how multi-row bf16 linears compute (``--cpu-compute-dtype``)."""
    global _setting, _measured_fp32
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"--cpu-compute-dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
    _setting, _measured_fp32 = name, None


def setting() -> str:
    """``--cpu-compute-dtype`` as set ("auto", "bfloat16" or "float32")."""
    return _setting


def settle(min_over_ranks: Callable[[int], int] = lambda vote: vote) -> None:
    """Times the fp32 paths once per process (:func:`_settle_widening`), then decides "auto" on
    a CPU with a bf16 dot product by timing oneDNN's bf16 GEMM against the faster of them.
    ``min_over_ranks`` is the TP group's minimum of one vote a rank (a collective)."""
    if _setting != "bfloat16":
        _settle_widening(min_over_ranks)
    _settle_auto(min_over_ranks)


def _settle_widening(min_over_ranks: Callable[[int], int]) -> None:
    """dstp's GEMM, unless MKL's on widened blocks timed ``MEASURED_MARGIN`` times faster at
    both ``WIDENING_PROBE_ROWS`` on every rank (only dstp's pays below ``MIN_ROWS`` rows).
    The ranks time together, after the vote's collective, as they will compute. With AVX512,
    dstp's ran 1.1-2x MKL's at 32-512 rows (benchmarks/FINDINGS.md); its 256-bit form has
    not met an AVX2-only host yet, hence the measurement. Both are fp32 sums rounded to bf16
    once, apart only in the order of the additions."""
    global _blocks_faster, _widening_timed
    if _widening_timed:
        return
    _widening_timed = True
    min_over_ranks(1)  # all ranks start timing together
    kernel, vote = _kernel(), 0
    if kernel is not None:
        speedups = [_kernel_speedup(kernel, rows) for rows in WIDENING_PROBE_ROWS]
        vote = int(max(speedups) <= 1 / MEASURED_MARGIN)
        log.info(
            "dstp's widening GEMM measured at %s MKL's on widened blocks (%s rows)",
            "/".join(f"{s:.2f}x" for s in speedups), "/".join(map(str, WIDENING_PROBE_ROWS)),
        )  # fmt: skip
    _blocks_faster = bool(min_over_ranks(vote))
    if _blocks_faster:
        log.info("fp32 bf16 linears of %d+ rows: MKL's on widened blocks", MIN_ROWS)


def _kernel_speedup(kernel: Callable[..., torch.Tensor], rows: int) -> float:
    """How many times faster dstp's GEMM ran than MKL's blocks for ``rows`` rows of the probe."""
    k, n = PROBE_SHAPE[1:]
    x, weight = torch.randn(rows, k).bfloat16(), torch.randn(n, k).bfloat16()
    kernel_s = median_seconds(lambda: kernel(x, weight, None))
    return median_seconds(lambda: _widened_blocks(x, weight, None)) / kernel_s


def _settle_auto(min_over_ranks: Callable[[int], int]) -> None:
    """Decides "auto" on a CPU with a bf16 dot product by timing both ways once.

    Each rank times oneDNN's bf16 GEMM against :func:`widened_linear` on its own
    threads (as it will run them); every rank widens only if every rank measured
    widening at least ``MEASURED_MARGIN`` times faster (``min_over_ranks`` is the
    TP group's), so all ranks round alike. About 0.3 s, once per process. A rank
    without a bf16 dot product joins the vote for widening (and always widens), so
    ranks on unlike CPUs still meet in the same collective.
    """
    global _measured_fp32
    if _setting != "auto" or _measured_fp32 is not None:
        return
    if not cpu_features.has_native_bf16_dot():
        min_over_ranks(1)  # the other ranks' collective; widening is the only fast path here
        _measured_fp32 = True
        return
    rows, k, n = PROBE_SHAPE
    x, weight = torch.randn(rows, k).bfloat16(), torch.randn(n, k).bfloat16()
    bf16_s = median_seconds(lambda: F.linear(x, weight))
    widened_s = median_seconds(lambda: widened_linear(x, weight))
    vote = int(bf16_s >= MEASURED_MARGIN * widened_s)
    _measured_fp32 = bool(min_over_ranks(vote))
    log.info(
        "bf16 linears of %d+ rows: %s (widened fp32 measured at %.2fx oneDNN bf16's rate)",
        MIN_ROWS, describe(), bf16_s / widened_s,
    )  # fmt: skip


def median_seconds(run: Callable[[], object], calls: int = 5) -> float:
    """The median time of ``calls`` calls of ``run`` after one warm-up (settle's timer)."""
    run()  # oneDNN builds its kernel on the first call
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2]


def computes_in_fp32() -> bool:
    """Whether bf16 linears of two or more rows on CPU compute in fp32 on widened weights
    (the setting; for "auto", the CPU's lack of a bf16 dot product or :func:`settle`'s
    measurement)."""
    if _setting == "auto":
        if _measured_fp32 is not None:
            return _measured_fp32
        return not cpu_features.has_native_bf16_dot()
    return _setting == "float32"


def widens(rows: int) -> bool:
    """Whether a bf16 linear of ``rows`` rows on CPU takes :func:`widened_linear` (dstp's
    few-row kernels, where they apply, are chosen before it)."""
    return computes_in_fp32() and rows >= (2 if _kernel() is not None else MIN_ROWS)


def widens_in_dstp_gemm() -> bool:
    """Whether multi-row bf16 linears compute in dstp's widening GEMM (not MKL's blocks or
    oneDNN's bf16 GEMM): where to hand rows over from the few-row kernels depends on it."""
    return computes_in_fp32() and _kernel() is not None


def describe() -> str:
    """The multi-row path in use, for start-up logs and benchmark records."""
    if computes_in_fp32():
        if _setting == "float32":
            why = "asked for"
        elif cpu_features.has_native_bf16_dot():
            why = "measured faster than oneDNN's bf16 GEMM here"
        else:
            why = "no bf16 dot product on this CPU"
        how = (
            "dstp GEMM, fp32 on bf16 weights widened as packed"
            if _kernel()
            else "fp32 on widened bf16 weight blocks"
        )
        return f"{how} ({why})"
    return "oneDNN bf16 GEMM"


def widened_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a 2-D bf16 ``x``, computed in fp32: dstp's GEMM,
    or MKL's on widened weight blocks (no kernels, or a strided weight)."""
    kernel = _kernel()
    if kernel is not None and weight.is_contiguous() and (bias is None or bias.is_contiguous()):
        return kernel(x.contiguous(), weight, bias)
    return _widened_blocks(x, weight, bias)


def _widened_blocks(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """:func:`widened_linear` by MKL: each block of weight rows widened into a reused buffer."""
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


def _kernel() -> Callable[..., torch.Tensor] | None:
    """dstp's widening GEMM, or None where its kernels are not built (or are switched off) or
    where :func:`settle` timed MKL's blocks faster."""
    from dstp.cpu import kernels  # here, not at the top: kernels imports this module

    return None if _blocks_faster else kernels.gemm_widened_op()


def _block_buffer(numel: int) -> torch.Tensor:
    """This thread's fp32 block buffer, grown when a wider weight needs it."""
    buffer = getattr(_buffers, "block", None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=torch.float32)
        _buffers.block = buffer
    return buffer[:numel]
