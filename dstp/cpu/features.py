"""What this x86 CPU can do, read once from ``/proc/cpuinfo``.

dstp picks its CPU kernels by these flags at run time (never by assumption: the
same wheel runs on Sapphire Rapids, Zen 4 and AVX2-only EPYCs), and the
benchmarks record them beside every figure.
"""

from __future__ import annotations

import functools

# the flags that decide a kernel, in the order a reader compares machines by
RELEVANT = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


@functools.cache
def flags() -> frozenset[str]:
    """The CPU's feature flags (empty where ``/proc/cpuinfo`` is missing)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[-1].split())
    except OSError:
        pass
    return frozenset()


def has_avx512_bf16() -> bool:
    return "avx512_bf16" in flags()


def has_avx2_fma() -> bool:
    return {"avx2", "fma"} <= flags()


def has_amx_bf16() -> bool:
    """AMX tiles with bf16: oneDNN's bf16 GEMM runs on them (the OS lists the flag only where
    it lets programs use the tiles)."""
    return "amx_bf16" in flags()


def has_native_bf16_dot() -> bool:
    """Whether oneDNN's bf16 GEMM has bf16 dot-product instructions (AVX512-BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & flags())


def relevant() -> list[str]:
    """The kernel-deciding flags this CPU has."""
    return [flag for flag in RELEVANT if flag in flags()]
