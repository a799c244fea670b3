"""dstp's own CPU kernels, compiled on first use (the way DeepSpeed builds its CPU ops).

Only where they beat PyTorch's: a single-row bf16 GEMV (batch-1 decode), a
few-row bf16 GEMM (batched decode, :func:`few_row_kernel_applies`) and, with AMX, a
GEMM on AMX tiles over the plain weights (:func:`amx_gemm_applies`), in two builds
chosen at run time by the CPU's flags in ``/proc/cpuinfo``:
``avx512_bf16`` gets ``csrc/gemv_bf16.cpp`` (native bf16 dot products), else
``avx2`` + ``fma`` gets ``csrc/gemv_bf16_avx2.cpp`` (bf16 widened to fp32 in
registers). Anything else, a CPU without either, no compiler, or
``DSTP_CPU_KERNELS=0`` falls back to PyTorch, with one log line saying why.
``DSTP_CPU_KERNEL=avx2`` forces the AVX2 build on an AVX512-BF16 CPU (to test
both on one machine). :func:`linear_2d` is the dispatch every TP layer calls:
this kernel, ATen's GEMV, or ``F.linear``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from dstp.cpu import features as cpu_features
from dstp.cpu import gemm as cpu_gemm

log = logging.getLogger("dstp")

CSRC = Path(__file__).with_name("csrc")
ENV_SWITCH = "DSTP_CPU_KERNELS"  # "0": no dstp kernels at all
ENV_KERNEL = "DSTP_CPU_KERNEL"  # "avx2": the AVX2 build even where AVX512-BF16 is there
ENV_AMX_GEMM = "DSTP_AMX_GEMM"  # "0": oneDNN's bf16 GEMM where dstp's AMX GEMM would run

# -fopenmp: without it at::parallel_for compiles to a serial loop and every kernel runs
# on one thread however many a rank has. Not linked: the GOMP symbols resolve to the
# libgomp torch has already loaded (as DeepSpeed's shm op does).
COMMON_FLAGS = ["-O3", "-fopenmp"]

# headers every kernel may include (hashed and copied with each build's sources)
HEADERS = sorted(CSRC.glob("*.h"))
# every op but the GEMVs, built into both extensions and bound by csrc/shared_ops.h
SHARED_SOURCES = sorted(p for p in CSRC.glob("*.cpp") if not p.name.startswith("gemv_"))
# kernel name -> (extension name, sources, extra compiler flags, what it needs, for the log)
KERNELS = {
    "avx512_bf16": (
        "dstp_cpu_kernels",
        [CSRC / "gemv_bf16.cpp", *SHARED_SOURCES],
        ["-mavx2", "-mfma"],  # for the shared sources; every AVX512-BF16 CPU has both
        "AVX512-BF16",
    ),
    "avx2": (
        "dstp_cpu_kernels_avx2",
        [CSRC / "gemv_bf16_avx2.cpp", *SHARED_SOURCES],
        ["-mavx2", "-mfma", "-DDSTP_AVX2_ONLY"],  # no AVX512 path even where the CPU has it
        "AVX2+FMA",
    ),
}


def _choose_kernel() -> str | None:
    """The GEMV this CPU runs best: AVX512-BF16's, else AVX2+FMA's, else None (PyTorch's)."""
    if os.environ.get(ENV_KERNEL) == "avx2" and cpu_features.has_avx2_fma():
        return "avx2"
    if cpu_features.has_avx512_bf16():
        return "avx512_bf16"
    if cpu_features.has_avx2_fma():
        return "avx2"
    return None


def kernel() -> str | None:
    """The name of the GEMV in use ("avx512_bf16", "avx2"), or None for PyTorch's."""
    ops = _ops()
    return None if ops is None else ops.dstp_kernel


@functools.cache
def _ops() -> ModuleType | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    name = _choose_kernel()
    if name is None:
        log.info(
            "neither AVX512-BF16 nor AVX2+FMA on this CPU: single-row bf16 linears use "
            "PyTorch's kernel"
        )
        return None
    return _build(name)


@functools.cache
def _build(name: str) -> ModuleType | None:
    """Builds (or loads the cached build of) one kernel; None, with a warning, if it fails."""
    ext, sources, flags, needs = KERNELS[name]
    try:
        from torch.utils.cpp_extension import load

        start = time.perf_counter()
        build_dir = _build_directory(name)
        with _exclusive_build(build_dir):
            ops = load(
                name=ext,
                sources=[
                    str(s) for s in _copy_sources(sources, build_dir / "src") if s.suffix == ".cpp"
                ],
                extra_cflags=[*COMMON_FLAGS, *flags],
                build_directory=str(build_dir),
            )
        ops.dstp_kernel = name
        # asked once a build: the OS hands a process the AMX tiles on request (csrc/gemm_amx.cpp)
        ops.amx_ready = (
            os.environ.get(ENV_AMX_GEMM, "1") != "0"
            and cpu_features.has_amx_bf16()
            and ops.amx_tiles_ready()
        )
        log.info(
            "dstp's %s GEMV (%s) is ready for batch-1 decode (%.1f s; built once, then cached)",
            needs,
            name,
            time.perf_counter() - start,
        )
        return ops
    except Exception as exc:  # no compiler, old compiler, no ninja: PyTorch's kernel still works
        log.warning(
            "could not build dstp's %s CPU kernel (%s); single-row bf16 linears use PyTorch's "
            "kernel. Install a C++ compiler and ninja, or set %s=0 to silence this.",
            needs,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            ENV_SWITCH,
        )
        return None


def _build_directory(name: str) -> Path:
    """Where one kernel is built: torch's extensions root, one folder per build's content.

    Keyed by the sources' bytes, the flags and torch's version, not by where dstp is
    installed: a wheel and a checkout of the same code share one build instead of each
    rebuilding it over the other's (ninja rebuilds when a source's path changes).
    """
    from torch.utils.cpp_extension import get_default_build_root

    ext, sources, flags, _ = KERNELS[name]
    digest = hashlib.sha256(f"{torch.__version__} {COMMON_FLAGS + flags}".encode())
    for source in [*sources, *HEADERS]:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    path = Path(root) / f"{ext}-torch{torch.__version__}-{digest.hexdigest()[:12]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _copy_sources(sources: list[Path], folder: Path) -> list[Path]:
    """The sources copied into the build folder (untouched when already there, so ninja's
    timestamps hold): the build then names the same paths from every installation."""
    folder.mkdir(exist_ok=True)
    copies = []
    for source in [*sources, *HEADERS]:
        copy = folder / source.name
        data = source.read_bytes()
        if not copy.exists() or copy.read_bytes() != data:
            copy.write_bytes(data)
        copies.append(copy)
    return copies


@contextlib.contextmanager
def _exclusive_build(build_dir: Path) -> Iterator[None]:
    """One builder at a time per folder, under a lock the OS drops when its holder dies.

    torch's own lock is a plain ``lock`` file that a killed build leaves behind, and every
    later start then waits for it forever. Holding this ``flock`` proves no live process is
    building here, so a ``lock`` file found under it is stale and is removed.
    """
    with open(build_dir / "dstp-build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                log.warning("removing %s, left by a kernel build that did not finish", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clear_stale_extension_lock(name: str, older_than_s: float = 900.0) -> None:
    """Removes torch's build ``lock`` of another package's extension if a dead build left it.

    For extensions dstp does not build itself (DeepSpeed's shared-memory all-reduce):
    without a lock of our own, a ``lock`` file older than any real build is taken as stale.
    """
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    with contextlib.suppress(FileNotFoundError):
        if time.time() - lock.stat().st_mtime > older_than_s:
            log.warning("removing %s, left by a build that did not finish", lock)
            lock.unlink()


def available() -> bool:
    """Whether the kernels are built (building them now if this is the first call)."""
    return _ops() is not None


def gemv_bf16(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``F.linear`` for one contiguous bf16 row ``[1, K]`` on CPU, or None when unavailable."""
    ops = _ops()
    return None if ops is None else ops.gemv_bf16(x, weight, bias)


def gemm_few_bf16(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``F.linear`` for a few contiguous bf16 rows on CPU (both builds), or None without it.

    On the AVX512-BF16 build, the variant :func:`settle_few_rows` chose (vdpbf16ps, or fp32
    FMAs on weights widened in registers)."""
    ops = _ops()
    few = getattr(ops, FEW_FMA_OP if _few_rows_fma else "gemm_few_bf16", None)
    return None if few is None else few(x, weight, bias)


def gemm_widened_op() -> Callable[..., torch.Tensor] | None:
    """Both builds' many-row GEMM (fp32 on bf16 weights widened as they are packed), or None
    without the kernels: :func:`dstp.cpu.gemm.widened_linear` calls it."""
    return getattr(_ops(), "gemm_widened_bf16", None)


# The AVX512-BF16 build's few-row kernel in two variants, alike but for how the fp32 sums are
# formed: vdpbf16ps ("gemm_few_bf16") or fp32 FMAs on weights widened in registers
# (FEW_FMA_OP). On a KVM Xeon without AMX vdpbf16ps issues at about half the FMA rate: the
# FMA variant measured 1.17-1.22x at the probe, ~1.0-1.1x with weights from DRAM at 16-55
# rows (benchmarks/FINDINGS.md, 2026-12-03); on Zen 4 the bf16 dot is the faster one.
# settle_few_rows times both once per process.
FEW_FMA_OP = "gemm_few_bf16_fma"
FEW_PROBE_SHAPE = (32, 2048, 2048)  # rows, in, out: ~0.27 GFLOP, the weight mostly in cache
_few_rows_fma: bool | None = None  # settle_few_rows' choice; None: not measured (vdpbf16ps)
# rows from which MKL's sgemm on widened blocks beats the FMA variant: it ran 1.26x the blocks
# at 64 rows, 1.16x at 96, a tie at 128 (1B shapes at TP=2, one thread; FINDINGS.md)
FEW_FMA_ROW_LIMIT = 112
# rows from which dstp's widening GEMM beats the fp32 few-row kernels (the FMA variant, the
# AVX2 build's), weights streaming from DRAM as in a decode step: the FMA variant ran
# 1.04-1.19x the GEMM at 32-40 rows, about even at 48-56, 0.86-0.97x from 64 (1B shapes at
# TP=2, one thread, 2026-12-04; benchmarks/FINDINGS.md)
DSTP_GEMM_ROW_LIMIT = 64
# rows from which oneDNN's bf16 GEMM on AMX tiles beats the few-row kernels, weights streaming
# from DRAM: the FMA variant ran 1.1-1.3x it at 2-4 rows, even at 8, 0.55x at 16, 0.37x at 32,
# 0.29x at 64 (Sapphire Rapids with AMX under KVM, 1B shapes at TP=2, one thread,
# 2026-12-04; benchmarks/FINDINGS.md). Where dstp's AMX GEMM is built it takes over sooner.
ONEDNN_AMX_ROW_LIMIT = 8
# rows dstp's AMX GEMM on the plain weights (csrc/gemm_amx.cpp) takes, [AMX_ROW_LIMIT,
# AMX_GEMM_ROW_LIMIT): it ran 1.5-1.7x oneDNN's bf16 GEMM at 4-64 rows, 1.2-1.4x at 96,
# 1.1-1.3x at 128, 1.0-1.1x at 160, 0.9-1.1x from 192 (weights in cache), and read the weights
# from DRAM 6-19 % faster than the few-row kernel at 4 rows, even or slower at 2 (the same
# host, one thread, 2026-12-04; FINDINGS.md)
AMX_ROW_LIMIT = 4
AMX_GEMM_ROW_LIMIT = 192


def settle_few_rows(min_over_ranks: Callable[[int], int] = lambda vote: vote) -> None:
    """Chooses the AVX512-BF16 build's few-row variant by timing both once per process.

    Each rank times both on its own threads (medians of 5 calls); every rank takes the FMA
    variant only if every rank measured it at least ``cpu_gemm.MEASURED_MARGIN`` times faster
    (``min_over_ranks`` is the TP group's), so all ranks round alike. Every call that has not
    settled votes, measured or not (0 where there is nothing to choose), so ranks never wait
    on each other. A few milliseconds.
    """
    global _few_rows_fma
    if _few_rows_fma is not None:
        return
    ops = _ops()
    ratio = None
    if hasattr(ops, FEW_FMA_OP) and hasattr(ops, "gemm_few_bf16"):
        rows, k, n = FEW_PROBE_SHAPE
        x, weight = torch.randn(rows, k).bfloat16(), torch.randn(n, k).bfloat16()
        dot_s = cpu_gemm.median_seconds(lambda: ops.gemm_few_bf16(x, weight, None))
        fma_s = cpu_gemm.median_seconds(lambda: getattr(ops, FEW_FMA_OP)(x, weight, None))
        ratio = dot_s / fma_s
    vote = int(ratio is not None and ratio >= cpu_gemm.MEASURED_MARGIN)
    _few_rows_fma = bool(min_over_ranks(vote))
    if ratio is not None:
        log.info(
            "bf16 linears of 2-%d rows: %s (the FMA variant measured at %.2fx vdpbf16ps' rate)",
            few_row_limit() - 1, few_row_variant(), ratio,
        )  # fmt: skip


def few_row_variant() -> str:
    """Which few-row kernel computes (logs, describe_paths)."""
    if not hasattr(_ops(), FEW_FMA_OP):
        return "few-row kernel"
    if _few_rows_fma:
        return "few-row kernel, fp32 FMAs on widened weights (measured faster than vdpbf16ps)"
    return "few-row kernel, vdpbf16ps"


def few_row_limit() -> int:
    """The fewest rows the few-row kernel leaves to the GEMMs: ``DSTP_GEMM_ROW_LIMIT`` where it
    computes in fp32 FMAs (the FMA variant, the AVX2 build) and dstp's widening GEMM takes the
    rest; on AMX tiles ``AMX_ROW_LIMIT`` where dstp's AMX GEMM takes it, else
    ``ONEDNN_AMX_ROW_LIMIT`` (oneDNN's bf16 GEMM); else
    ``FEW_FMA_ROW_LIMIT`` for the FMA variant (MKL's widened blocks need more rows to pay for
    their widening pass), ``cpu_gemm.MIN_ROWS`` for the others."""
    avx2 = getattr(_ops(), "dstp_kernel", None) == "avx2"
    if (_few_rows_fma or avx2) and cpu_gemm.widens_in_dstp_gemm():
        return DSTP_GEMM_ROW_LIMIT
    if cpu_features.has_amx_bf16() and not cpu_gemm.computes_in_fp32():
        return AMX_ROW_LIMIT if amx_gemm_in_use() else ONEDNN_AMX_ROW_LIMIT
    return FEW_FMA_ROW_LIMIT if _few_rows_fma else cpu_gemm.MIN_ROWS


def few_row_kernel_applies(rows: int) -> bool:
    """Whether a bf16 linear of ``rows`` rows on CPU takes dstp's few-row kernel: 2 to
    ``few_row_limit() - 1`` rows.

    The AVX2 build's widens the weights to fp32 in registers: it takes them where
    multi-row linears compute in fp32 (:func:`dstp.cpu.gemm.computes_in_fp32`). The
    AVX512-BF16 build's accumulates in fp32 as oneDNN's bf16 GEMM does and reads each
    weight once: it takes them whatever ``--cpu-compute-dtype`` says, but for "bfloat16"
    (oneDNN's bf16 GEMM everywhere). On a KVM Xeon without AMX it ran 1.35-1.75x oneDNN's
    bf16 GEMM at 2-4 rows (memory-bound), 1.04-1.29x at 8-32, a tie at 48-55 (both
    compute-bound): benchmarks/FINDINGS.md, 2026-12-03. With AMX, oneDNN's GEMM wins from 8
    rows (``AMX_ROW_LIMIT``).
    """
    if not 2 <= rows < few_row_limit():
        return False
    ops = _ops()
    if not hasattr(ops, "gemm_few_bf16"):
        return False
    if ops.dstp_kernel == "avx512_bf16":
        return cpu_gemm.setting() != "bfloat16"
    return cpu_gemm.computes_in_fp32()


def amx_gemm_ready() -> bool:
    """Whether dstp's AMX GEMM runs here: the CPU lists AMX-BF16, the build has the kernel and
    the OS lets this process use the tiles."""
    return cpu_features.has_amx_bf16() and getattr(_ops(), "amx_ready", False)


def amx_gemm_in_use() -> bool:
    """Whether dstp's AMX GEMM takes its rows: it is ready and multi-row linears compute in
    bf16 by "auto"'s choice (``--cpu-compute-dtype bfloat16`` asks for oneDNN's GEMM
    everywhere, as it does of the few-row kernels; widened linears compute in fp32)."""
    return cpu_gemm.setting() == "auto" and not cpu_gemm.computes_in_fp32() and amx_gemm_ready()


def amx_gemm_applies(rows: int, weight: torch.Tensor) -> bool:
    """Whether a bf16 linear of ``rows`` rows on CPU takes dstp's AMX GEMM: ``AMX_ROW_LIMIT``
    to ``AMX_GEMM_ROW_LIMIT - 1`` rows where :func:`amx_gemm_in_use`, a weight of a multiple
    of 16 rows and 32 columns (the tiles')."""
    n, k = weight.shape
    return (
        AMX_ROW_LIMIT <= rows < AMX_GEMM_ROW_LIMIT
        and n % 16 == 0
        and k % 32 == 0
        and amx_gemm_in_use()
    )


def gemm_amx_bf16(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` for contiguous bf16 rows on AMX tiles, the weight read in its plain layout
    (see csrc/gemm_amx.cpp); only where :func:`amx_gemm_applies`."""
    return _ops().gemm_amx_bf16(x, weight, bias)


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Llama's RMSNorm of contiguous bf16 CPU rows in one call (HF's rounding), or None."""
    if torch.compiler.is_compiling():  # the build as an opaque op (--compile-decode)
        from dstp.cpu import opaque_ops

        return opaque_ops.rms_norm_bf16(x, weight, eps)
    norm = getattr(_ops(), "rms_norm_bf16", None)
    return None if norm is None else norm(x, weight, eps)


def add_rms_norm_bf16(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(RMSNorm(residual + x), residual + x)`` of contiguous bf16 CPU rows in one call (the
    sum rounded as ATen's add, the norm as HF's), or None without the kernel (the caller
    then adds and norms in two ops)."""
    if torch.compiler.is_compiling():
        from dstp.cpu import opaque_ops

        return opaque_ops.add_rms_norm_bf16(x, residual, weight, eps)
    fused = getattr(_ops(), "add_rms_norm_bf16", None)
    return None if fused is None else fused(x, residual, weight, eps, 1.0)


def rotary_bf16(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """Half-split rotary of bf16 CPU heads ``x [B, T, N, d]`` by ``cos``/``sin [B or 1, T, d]``
    (``sin`` signed as :func:`dstp.model.fused_layers.rotate` takes it) in one call, as
    ``addcmul(x * cos, roll(x), sin)`` rounds it; or None without the kernel."""
    if torch.compiler.is_compiling():
        from dstp.cpu import opaque_ops

        return opaque_ops.rotary_bf16(x, cos, sin)
    rotary = getattr(_ops(), "rotary_bf16", None)
    return None if rotary is None else rotary(x, cos, sin)


def silu_mul_bf16(gate_up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` of a contiguous bf16 CPU ``[..., 2 * inner]`` (gate, then up) in one
    call, rounded as the two ATen ops round; or None without the kernel."""
    if torch.compiler.is_compiling():
        from dstp.cpu import opaque_ops

        return opaque_ops.silu_mul_bf16(gate_up)
    silu_mul = getattr(_ops(), "silu_mul_bf16", None)
    return None if silu_mul is None else silu_mul(gate_up)


def write_kv_cache_bf16(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> bool:
    """Write ``key``/``value [KV, T, d]`` (bf16) into the bf16 caches ``[KV, slots, d]`` at each
    token's slot in one call (both ``index_copy_`` calls); False without the kernel."""
    if torch.compiler.is_compiling():
        from dstp.cpu import opaque_ops

        return opaque_ops.write_kv_cache_bf16(key, value, k_cache, v_cache, slots)
    write = getattr(_ops(), "write_kv_cache_bf16", None)
    if write is None:
        return False
    write(key, value, k_cache, v_cache, slots)
    return True


def decode_attention_bf16(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    scaling: float,
    softcap: float | None,
    window: int | None,
) -> torch.Tensor | None:
    """Paged decode attention in one call: ``[T, H, dv]`` bf16 with the decoding sequences' rows
    ``rows`` attended over their blocks (scores, softmax and values in fp32), the other rows
    unset; or None without the kernel. See csrc/decode_attention.cpp."""
    args = (query, k_cache, v_cache, rows, tables, lens, block_size, scaling)
    args += (softcap or 0.0, window or 0)
    if torch.compiler.is_compiling():
        from dstp.cpu import opaque_ops

        return opaque_ops.decode_attention_bf16(*args)
    attend = getattr(_ops(), "decode_attention_bf16", None)
    return None if attend is None else attend(*args)


def describe_paths() -> dict[str, str]:
    """What computes a bf16 linear of one, a few and many rows here (logs, benchmarks)."""
    gemv = kernel()
    # the few-row kernel takes all of 2 to few_row_limit() - 1 rows or none
    few_path = f"dstp {gemv} {few_row_variant()}" if few_row_kernel_applies(2) else "oneDNN"
    limit = few_row_limit()
    many = {f"{limit}+ rows": cpu_gemm.describe()}
    if amx_gemm_in_use():
        many = {
            f"{limit}-{AMX_GEMM_ROW_LIMIT - 1} rows": "dstp AMX GEMM (plain weights)",
            f"{AMX_GEMM_ROW_LIMIT}+ rows": cpu_gemm.describe(),
        }
    return {
        "one_row": f"dstp {gemv} GEMV" if gemv else "ATen GEMV",
        f"2-{limit - 1} rows": few_path,
        **many,
        "decode attention": "dstp paged kernel (bf16 cache)"
        if hasattr(_ops(), "decode_attention_bf16")
        else "PyTorch matmuls",
    }


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
      thread: 2.8 vs 1.5 ms), and dstp's four-stream kernel about 1.3x ATen's
      on Zen 4 (AVX512-BF16), ~1.8x on an AVX2-only EPYC (benchmarks/gemv.py);
      from two rows oneDNN beats ATen.
    - From 2 rows dstp's few-row kernel, weights read once, wherever
      :func:`few_row_kernel_applies` (AVX512-BF16 build: bf16 dot products or, where
      measured faster, fp32 FMAs on weights widened in registers; AVX2 build, on a CPU
      without them: the latter); with AMX, dstp's AMX GEMM from 4 rows to 191
      (:func:`amx_gemm_applies`); past them fp32 GEMMs on widened weight blocks where those
      compute (:mod:`dstp.cpu.gemm`), else oneDNN's bf16 GEMM.
    """
    flat = x.reshape(-1, x.shape[-1])
    bf16_on_cpu = weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
    rows = flat.shape[0]
    if bf16_on_cpu and torch.compiler.is_compiling():
        from dstp.cpu import opaque_ops  # this dispatch, as one op the compiler keeps whole

        out = opaque_ops.linear_bf16_cpu(flat, weight, bias)
    elif bf16_on_cpu and rows == 1:
        out = _single_row_bf16(flat, weight, bias)
    elif bf16_on_cpu and amx_gemm_applies(rows, weight) and _kernel_takes(weight, bias):
        out = gemm_amx_bf16(flat.contiguous(), weight, bias)
    elif bf16_on_cpu and few_row_kernel_applies(rows) and _kernel_takes(weight, bias):
        out = gemm_few_bf16(flat.contiguous(), weight, bias)
        if out is None:
            out = F.linear(flat, weight, bias)
    elif bf16_on_cpu and cpu_gemm.widens(rows) and not _needs_grad(weight):
        out = cpu_gemm.widened_linear(flat, weight, bias)
    else:
        out = F.linear(flat, weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def _single_row_bf16(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """dstp's streaming GEMV when built (see gemv_bf16), else ATen's (not oneDNN's)."""
    if _kernel_takes(weight, bias):
        out = gemv_bf16(x.contiguous(), weight, bias)
        if out is not None:
            return out
    with _aten_cpu_kernels():
        return F.linear(x, weight, bias)


def _kernel_takes(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """What dstp's kernels take: no autograd (they have no backward), a contiguous weight,
    no bias or a contiguous bf16 one."""
    bias_ok = bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous())
    return not _needs_grad(weight) and weight.is_contiguous() and bias_ok


def _needs_grad(weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and weight.requires_grad


@contextlib.contextmanager
def _aten_cpu_kernels() -> Iterator[None]:
    """oneDNN off for the enclosed ops (thread-local enough: one engine thread per process)."""
    previous = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(previous)


# -- the sampler's kernels (csrc/sampler_ops.cpp, issue 22) ----------------------------------


def sampler_ops() -> ModuleType | None:
    """The sampler's fused CPU ops, or None without a build or while compiling (the sampler
    then runs its plain PyTorch ops, which a GPU runs as they are)."""
    if torch.compiler.is_compiling():
        return None
    ops = _ops()
    return ops if hasattr(ops, "sample_rows") else None
