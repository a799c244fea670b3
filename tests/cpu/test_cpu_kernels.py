"""dstp's single-row bf16 GEMVs match PyTorch's, and fall back cleanly without them."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import _get_build_directory

from dstp.cpu import features as cpu_features
from dstp.cpu import gemm as cpu_gemm
from dstp.cpu import kernels as cpu_kernels
from dstp.cpu.kernels import _aten_cpu_kernels, linear_2d

needs_kernel = pytest.mark.skipif(
    not cpu_features.has_avx512_bf16(), reason="CPU without AVX512-BF16"
)
needs_avx2 = pytest.mark.skipif(not cpu_features.has_avx2_fma(), reason="CPU without AVX2+FMA")

# every kernel this CPU can run: the AVX512-BF16 one where it exists, the AVX2 one wherever
# AVX2+FMA exist (forced with DSTP_CPU_KERNEL=avx2 on AVX512-BF16 CPUs)
KERNELS = [
    pytest.param("avx512_bf16", marks=needs_kernel),
    pytest.param("avx2", marks=needs_avx2),
]


@pytest.fixture
def fresh_dispatch():
    """Clears the cached kernel choice before and after (the choice reads the environment),
    and the few-row variant settle_few_rows chose (the dpbf16 one, unsettled, inside)."""
    cpu_kernels._ops.cache_clear()
    settled, cpu_kernels._few_rows_fma = cpu_kernels._few_rows_fma, None
    yield
    cpu_kernels._ops.cache_clear()
    cpu_kernels._few_rows_fma = settled


@pytest.fixture(params=KERNELS)
def chosen(request, monkeypatch, fresh_dispatch):
    """Makes each kernel the one in use in turn, and yields its name."""
    if request.param == "avx2":
        monkeypatch.setenv(cpu_kernels.ENV_KERNEL, "avx2")
    else:
        monkeypatch.delenv(cpu_kernels.ENV_KERNEL, raising=False)
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    return request.param


def test_kernel_builds_where_the_cpu_supports_it(chosen):
    assert cpu_kernels.available()
    assert cpu_kernels.kernel() == chosen


def test_each_build_runs_its_loops_on_the_ranks_threads(chosen):
    """Without -fopenmp, at::parallel_for compiles to a serial loop: one thread per kernel
    however many a rank has. A built .so that calls into OpenMP names GOMP_parallel."""
    from pathlib import Path

    ops = cpu_kernels._ops()
    assert ops is not None
    assert b"GOMP_parallel" in Path(ops.__file__).read_bytes()


def test_dispatch_by_cpu_flags(monkeypatch, fresh_dispatch):
    monkeypatch.delenv(cpu_kernels.ENV_KERNEL, raising=False)
    for flags, expected in [
        ({"avx512_bf16", "avx2", "fma"}, "avx512_bf16"),
        ({"avx512f", "avx2", "fma"}, "avx2"),
        ({"avx2", "fma"}, "avx2"),
        ({"avx2"}, None),  # no FMA
        ({"avx", "sse4_2"}, None),
        (set(), None),  # no /proc/cpuinfo
    ]:
        monkeypatch.setattr(cpu_features, "flags", lambda f=flags: frozenset(f))
        assert cpu_kernels._choose_kernel() == expected, flags
    monkeypatch.setenv(cpu_kernels.ENV_KERNEL, "avx2")  # forced, where the CPU can run it
    monkeypatch.setattr(cpu_features, "flags", lambda: frozenset({"avx512_bf16", "avx2", "fma"}))
    assert cpu_kernels._choose_kernel() == "avx2"
    monkeypatch.setattr(cpu_features, "flags", lambda: frozenset({"avx512_bf16"}))
    assert cpu_kernels._choose_kernel() == "avx512_bf16"


@pytest.mark.skipif(
    cpu_features.has_avx512_bf16() or not cpu_features.has_avx2_fma(),
    reason="for CPUs with AVX2+FMA but no AVX512-BF16",
)
def test_avx2_kernel_is_chosen_without_avx512_bf16(monkeypatch, fresh_dispatch):
    monkeypatch.delenv(cpu_kernels.ENV_KERNEL, raising=False)
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    assert cpu_kernels.kernel() == "avx2"


@pytest.mark.parametrize(
    "n,k,bias",
    [
        (4096, 2048, False),
        (1023, 2048, True),
        (1023, 2056, False),  # K a multiple of 8, not of 16
        (9, 4100, True),  # K a multiple of 4 only
        (7, 100, True),
        (5, 31, False),  # K odd, below one vector
        (4, 32, True),
        (3, 48, True),  # N below the four row streams: all rows in the tail
        (1, 17, False),
        (6, 1, True),
    ],
)
def test_matches_pytorch_within_bf16_rounding(chosen, n, k, bias):
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    exact = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = cpu_kernels.gemv_bf16(x, w, b)
    assert got.shape == (1, n) and got.dtype == torch.bfloat16
    # one bf16 rounding of the fp32 sum: within half a bf16 ulp of |y| (2^-9), plus sum order
    tol = exact.abs() * 2**-8 + 1e-3 * exact.abs().max()
    assert ((got.float() - exact).abs() <= tol).all()
    # mostly the very rounding of the fp32 result (round to nearest even, as .to(bf16))
    assert (got == exact.bfloat16()).float().mean() >= 0.9
    assert torch.allclose(got.float(), F.linear(x, w, b).float(), rtol=2**-7, atol=1e-2)


@pytest.fixture
def avx2(monkeypatch, fresh_dispatch):
    """The AVX2 build in use."""
    monkeypatch.setenv(cpu_kernels.ENV_KERNEL, "avx2")
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)


@pytest.fixture
def avx512_bf16(monkeypatch, fresh_dispatch):
    """The AVX512-BF16 build in use, multi-row linears as "auto" has them, AMX hidden (its
    hand-over is its own test's) so the hand-overs do not depend on the host."""
    monkeypatch.delenv(cpu_kernels.ENV_KERNEL, raising=False)
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    monkeypatch.setattr(cpu_gemm, "_setting", "auto")
    flags = cpu_features.flags() - {"amx_bf16"}
    monkeypatch.setattr(cpu_features, "flags", lambda: flags)
    assert cpu_kernels.kernel() == "avx512_bf16"


# both builds' few-row kernels (AVX2: pairs of x rows against 4 weight rows, blocks of 48;
# AVX512-BF16: groups of up to 6 x rows against 8, 6 or 4 weight rows, 32 columns a step,
# blocks of 48; its FMA variant: groups of up to 8 x rows, as even as they go, against 8, 6,
# 4 or 3 weight rows), each variant ("fma": the AVX512-BF16 build's gemm_few_bf16_fma)
@pytest.mark.parametrize("variant", ["chosen", "fma"])
@pytest.mark.parametrize(
    "m,n,k,bias",
    [
        (2, 1023, 2048, True),  # 4 weight rows per pass; a last block of 15, 3 rows alone
        (2, 101, 33, False),  # AVX512: 8 rows a pass, 5 alone; a tail of one column
        (3, 37, 100, False),  # K with a tail of 4
        (3, 50, 2047, True),  # an odd K: the last pair half zero
        (4, 64, 4096, True),  # several column chunks
        (5, 17, 31, True),  # K below one vector: all tail
        (7, 4097, 2056, False),  # AVX512: a group of 6 x rows and one alone
        (7, 97, 70, True),
        (8, 33, 16, True),
        (9, 100, 300, False),  # four pairs of x rows and one alone; blocks of 48, 48, 4
        (17, 5, 1040, True),
        (cpu_gemm.MIN_ROWS - 1, 70, 48, True),  # the most rows it takes
        (16, 49, 96, True),  # FMA: two groups of 8 x rows
        (cpu_gemm.MIN_ROWS - 1, 131, 200, False),  # AVX512: nine groups of 6 and one of 1
    ],
)
def test_few_rows_match_fp32_math_rounded_once(chosen, variant, m, n, k, bias):
    if variant == "fma" and chosen != "avx512_bf16":
        pytest.skip("the FMA variant is the AVX512-BF16 build's")
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    exact = F.linear(x.float(), w.float(), None if b is None else b.float())
    if variant == "fma":
        got = cpu_kernels._ops().gemm_few_bf16_fma(x, w, b)
    else:
        got = cpu_kernels.gemm_few_bf16(x, w, b)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    tol = exact.abs() * 2**-8 + 1e-3 * exact.abs().max()
    assert ((got.float() - exact).abs() <= tol).all()
    assert (got == exact.bfloat16()).float().mean() >= 0.9


@needs_avx2
def test_linear_2d_takes_the_few_row_kernel_below_the_widened_gemm(avx2, monkeypatch):
    calls = []
    real = cpu_kernels.gemm_few_bf16
    monkeypatch.setattr(
        cpu_kernels, "gemm_few_bf16", lambda x, *a: calls.append(x.shape[0]) or real(x, *a)
    )
    w = torch.randn(64, 128).bfloat16()
    monkeypatch.setattr(cpu_gemm, "_setting", "float32")
    limit = cpu_kernels.few_row_limit()  # dstp's widening GEMM takes rows from here
    assert limit == (
        cpu_gemm.MIN_ROWS if cpu_gemm._blocks_faster else cpu_kernels.DSTP_GEMM_ROW_LIMIT
    )
    for rows in (1, 2, limit - 1, limit):
        linear_2d(torch.randn(rows, 128).bfloat16(), w)
    linear_2d(torch.randn(3, 128).bfloat16(), torch.randn(64, 256).bfloat16()[:, ::2])  # strided
    assert calls == [2, limit - 1]
    monkeypatch.setattr(cpu_gemm, "_setting", "bfloat16")  # oneDNN's bf16 GEMM, as asked
    x = torch.randn(3, 128).bfloat16()
    assert torch.equal(linear_2d(x, w), F.linear(x, w))
    assert len(calls) == 2


@needs_kernel
@pytest.mark.parametrize("setting", ["auto", "float32"])
def test_linear_2d_takes_the_avx512_few_row_kernel_unless_bf16_is_asked_for(
    avx512_bf16, monkeypatch, setting
):
    """The AVX512-BF16 build's kernel accumulates in fp32 as oneDNN's bf16 GEMM does: it takes
    2-55 rows whatever --cpu-compute-dtype says, but for "bfloat16" (oneDNN everywhere)."""
    calls = []
    real = cpu_kernels.gemm_few_bf16
    monkeypatch.setattr(
        cpu_kernels, "gemm_few_bf16", lambda x, *a: calls.append(x.shape[0]) or real(x, *a)
    )
    monkeypatch.setattr(cpu_gemm, "_setting", setting)
    w, b = torch.randn(64, 128).bfloat16(), torch.randn(64).bfloat16()
    x = torch.randn(2, 4, 128).bfloat16()  # batch-8 decode, flattened
    got = linear_2d(x, w, b)
    assert calls == [8] and got.shape == (2, 4, 64)
    exact = F.linear(x.float(), w.float(), b.float())
    assert ((got.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-3 * exact.abs().max()).all()
    for rows in (1, 2, cpu_gemm.MIN_ROWS - 1, cpu_gemm.MIN_ROWS):
        linear_2d(torch.randn(rows, 128).bfloat16(), w)
    assert calls == [8, 2, cpu_gemm.MIN_ROWS - 1]
    assert "few-row kernel" in cpu_kernels.describe_paths()[f"2-{cpu_gemm.MIN_ROWS - 1} rows"]
    monkeypatch.setattr(cpu_gemm, "_setting", "bfloat16")
    x = torch.randn(8, 128).bfloat16()
    assert torch.equal(linear_2d(x, w), F.linear(x, w))
    assert len(calls) == 3
    assert cpu_kernels.describe_paths()[f"2-{cpu_gemm.MIN_ROWS - 1} rows"] == "oneDNN"


@needs_kernel
def test_the_fma_variant_hands_rows_to_the_widening_gemm_at_its_own_limit(avx512_bf16, monkeypatch):
    """Where the FMA variant computes, dstp's widening GEMM beat it from 64 rows (weights from
    DRAM): linears from ``DSTP_GEMM_ROW_LIMIT`` rows take the GEMM, below it the variant; the
    vdpbf16ps variant hands over at ``cpu_gemm.MIN_ROWS``."""
    calls, widened = [], []
    real_few, real_widened = cpu_kernels.gemm_few_bf16, cpu_gemm.widened_linear
    monkeypatch.setattr(
        cpu_kernels, "gemm_few_bf16", lambda x, *a: calls.append(x.shape[0]) or real_few(x, *a)
    )
    monkeypatch.setattr(
        cpu_gemm, "widened_linear", lambda x, *a: widened.append(x.shape[0]) or real_widened(x, *a)
    )
    monkeypatch.setattr(cpu_gemm, "_setting", "float32")
    monkeypatch.setattr(cpu_gemm, "_blocks_faster", False)
    monkeypatch.setattr(cpu_kernels, "_few_rows_fma", True)
    limit = cpu_kernels.DSTP_GEMM_ROW_LIMIT
    assert limit == cpu_kernels.few_row_limit() > cpu_gemm.MIN_ROWS
    w = torch.randn(64, 128).bfloat16()
    for rows in (2, cpu_gemm.MIN_ROWS, limit - 1, limit):
        x = torch.randn(rows, 128).bfloat16()
        got = linear_2d(x, w)
        exact = F.linear(x.float(), w.float())
        assert ((got.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-3 * exact.abs().max()).all()
    assert calls == [2, cpu_gemm.MIN_ROWS, limit - 1] and widened == [limit]
    paths = cpu_kernels.describe_paths()
    assert "fp32 FMAs" in paths[f"2-{limit - 1} rows"] and "dstp GEMM" in paths[f"{limit}+ rows"]
    monkeypatch.setattr(cpu_gemm, "_blocks_faster", True)  # MKL's blocks: the variant to 111
    assert cpu_kernels.few_row_limit() == cpu_kernels.FEW_FMA_ROW_LIMIT
    monkeypatch.setattr(cpu_kernels, "_few_rows_fma", False)  # vdpbf16ps: the GEMMs from 56
    linear_2d(torch.randn(cpu_gemm.MIN_ROWS, 128).bfloat16(), w)
    assert widened == [limit, cpu_gemm.MIN_ROWS]


@needs_avx2
def test_the_avx2_build_hands_rows_to_dstp_gemm_at_its_limit(avx2, monkeypatch):
    """The AVX2 build's few-row kernel computes in fp32 FMAs too: dstp's widening GEMM takes
    rows from ``DSTP_GEMM_ROW_LIMIT``, MKL's widened blocks (where settle timed them faster)
    from ``cpu_gemm.MIN_ROWS``."""
    monkeypatch.setattr(cpu_gemm, "_setting", "float32")
    monkeypatch.setattr(cpu_gemm, "_blocks_faster", False)
    assert cpu_kernels.few_row_limit() == cpu_kernels.DSTP_GEMM_ROW_LIMIT
    assert not cpu_kernels.few_row_kernel_applies(cpu_kernels.DSTP_GEMM_ROW_LIMIT)
    monkeypatch.setattr(cpu_gemm, "_blocks_faster", True)
    assert cpu_kernels.few_row_limit() == cpu_gemm.MIN_ROWS
    assert cpu_kernels.few_row_kernel_applies(cpu_gemm.MIN_ROWS - 1)
    assert not cpu_gemm.widens(cpu_gemm.MIN_ROWS - 1) and cpu_gemm.widens(cpu_gemm.MIN_ROWS)


@needs_kernel
@pytest.mark.parametrize("op", ["gemm_few_bf16", "gemm_few_bf16_fma"])
def test_the_avx512_few_row_kernel_checks_its_inputs(avx512_bf16, op):
    few = getattr(cpu_kernels._ops(), op)
    w = torch.randn(64, 128).bfloat16()
    with pytest.raises(RuntimeError, match="columns"):
        few(torch.randn(4, 100).bfloat16(), w, None)
    with pytest.raises(RuntimeError, match="bf16 inputs only"):
        few(torch.randn(4, 128), w, None)
    with pytest.raises(RuntimeError, match="bias"):
        few(torch.randn(4, 128).bfloat16(), w, torch.randn(63).bfloat16())


@needs_kernel
@pytest.mark.parametrize(
    "dot_s,fma_s,other_ranks_vote,fma",
    [
        (1.45, 1.0, 1, True),  # vdpbf16ps at half the FMA rate (a KVM Xeon without AMX)
        (1.05, 1.0, 1, False),  # a near tie keeps vdpbf16ps: no flip between runs
        (0.8, 1.0, 1, False),  # the bf16 dot pays (Zen 4)
        (1.45, 1.0, 0, False),  # another rank measured otherwise: all ranks round alike
    ],
)
def test_settle_few_rows_picks_the_variant_by_measurement(
    avx512_bf16, monkeypatch, dot_s, fma_s, other_ranks_vote, fma
):
    times = iter([dot_s, fma_s])
    monkeypatch.setattr(cpu_gemm, "median_seconds", lambda run: next(times))
    monkeypatch.setattr(cpu_gemm, "_setting", "float32")  # dstp's GEMM past the few rows
    monkeypatch.setattr(cpu_gemm, "_blocks_faster", False)
    votes = []
    cpu_kernels.settle_few_rows(lambda vote: votes.append(vote) or min(vote, other_ranks_vote))
    assert votes == [int(dot_s >= cpu_gemm.MEASURED_MARGIN * fma_s)]
    limit = cpu_kernels.few_row_limit()
    assert limit == (cpu_kernels.DSTP_GEMM_ROW_LIMIT if fma else cpu_gemm.MIN_ROWS)
    few_path = cpu_kernels.describe_paths()[f"2-{limit - 1} rows"]
    assert ("fp32 FMAs" in few_path) is fma and ("vdpbf16ps" in few_path)
    cpu_kernels.settle_few_rows(lambda vote: 1 / 0)  # settled once per process
    ops, calls = cpu_kernels._ops(), []
    for name in ("gemm_few_bf16", "gemm_few_bf16_fma"):
        real = getattr(ops, name)
        monkeypatch.setattr(
            ops, name, lambda x, *a, name=name, real=real: calls.append(name) or real(x, *a)
        )
    x, w = torch.randn(8, 128).bfloat16(), torch.randn(64, 128).bfloat16()
    got = linear_2d(x, w)
    assert calls == ["gemm_few_bf16_fma" if fma else "gemm_few_bf16"]
    exact = F.linear(x.float(), w.float())
    assert ((got.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-3 * exact.abs().max()).all()


def test_settle_few_rows_votes_without_a_choice(fresh_dispatch, monkeypatch):
    """A build without the FMA variant (AVX2, none) measures nothing but still meets the
    other ranks' vote: no rank waits for one that skipped it."""
    monkeypatch.setattr(cpu_kernels, "_ops", lambda: object())
    monkeypatch.setattr(cpu_gemm, "median_seconds", lambda run: 1 / 0)
    votes = []
    cpu_kernels.settle_few_rows(lambda vote: votes.append(vote) or vote)
    assert votes == [0] and cpu_kernels._few_rows_fma is False
    assert (
        cpu_kernels.gemm_few_bf16(torch.randn(3, 8).bfloat16(), torch.randn(4, 8).bfloat16())
        is None
    )


def test_few_rows_fall_back_where_the_build_lacks_the_kernel(monkeypatch):
    """A build without the few-row kernel (or none): oneDNN computes."""
    monkeypatch.setattr(cpu_kernels, "_ops", lambda: object())
    monkeypatch.setattr(cpu_gemm, "_setting", "float32")
    w, x = torch.randn(64, 128).bfloat16(), torch.randn(3, 128).bfloat16()
    assert cpu_kernels.gemm_few_bf16(x, w) is None
    assert torch.equal(linear_2d(x, w), F.linear(x, w))


def test_rounds_to_nearest_even_and_keeps_specials(chosen):
    # exact sums (small integers times powers of two): the only error is the final rounding
    k = 40
    x = torch.zeros(1, k).bfloat16()
    x[0, 0], x[0, 33] = 1.0, 2.0**-8  # one in the vector part, one in the tail
    w = torch.zeros(5, k).bfloat16()
    w[:, 0] = torch.tensor([1.0, 1.0, 1.0 + 2**-7, 3.0, 1.0])
    w[:, 33] = torch.tensor([1.0, 3.0, 1.0, 1.0, 0.0])
    w[4, 5] = float("inf")
    exact = F.linear(x.float(), w.float())
    got = cpu_kernels.gemv_bf16(x, w)
    assert torch.equal(got[0, :4], exact[0, :4].bfloat16())  # ties to even, both ways
    assert torch.isnan(got[0, 4])  # 0 * inf, as F.linear in fp32


def test_linear_2d_uses_the_kernel_for_single_rows(chosen, monkeypatch):
    calls = []
    real = cpu_kernels.gemv_bf16
    monkeypatch.setattr(cpu_kernels, "gemv_bf16", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(64, 128).bfloat16()
    b = torch.randn(64).bfloat16()
    x = torch.randn(1, 1, 128).bfloat16()
    out = linear_2d(x, w, b)  # batch-1 decode: the kernel
    assert out.shape == (1, 1, 64)
    exact = F.linear(x.float(), w.float(), b.float())
    assert ((out.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-3 * exact.abs().max()).all()
    x3 = torch.randn(1, 3, 128).bfloat16()
    monkeypatch.setattr(cpu_gemm, "_setting", "bfloat16")  # no few-row kernel in either build
    assert torch.equal(linear_2d(x3, w, b), F.linear(x3, w, b))  # three rows: oneDNN
    assert calls == [1]


def test_switched_off_falls_back_to_pytorch(monkeypatch, fresh_dispatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    monkeypatch.setenv(cpu_kernels.ENV_KERNEL, "avx2")  # the switch wins over the choice
    assert cpu_kernels.gemv_bf16(torch.ones(1, 8).bfloat16(), torch.ones(4, 8).bfloat16()) is None
    assert cpu_kernels.kernel() is None
    x, w = torch.randn(1, 1, 128).bfloat16(), torch.randn(64, 128).bfloat16()
    with _aten_cpu_kernels():  # ATen's GEMV, the fallback
        expected = F.linear(x, w)
    assert torch.equal(linear_2d(x, w), expected)


def test_cpu_without_either_falls_back_to_pytorch(monkeypatch, fresh_dispatch):
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    monkeypatch.setattr(cpu_features, "flags", lambda: frozenset({"sse4_2", "avx"}))
    assert not cpu_kernels.available() and cpu_kernels.kernel() is None
    x, w = torch.randn(1, 1, 128).bfloat16(), torch.randn(64, 128).bfloat16()
    with _aten_cpu_kernels():
        expected = F.linear(x, w)
    assert torch.equal(linear_2d(x, w), expected)


def test_failed_build_falls_back_to_pytorch(monkeypatch, fresh_dispatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    monkeypatch.setattr(cpu_features, "flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    cpu_kernels._build.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="dstp"):
            assert not cpu_kernels.available()
        assert "no compiler here" in caplog.text
        x, w = torch.randn(1, 1, 128).bfloat16(), torch.randn(64, 128).bfloat16()
        with _aten_cpu_kernels():
            expected = F.linear(x, w)
        assert torch.equal(linear_2d(x, w), expected)
    finally:
        cpu_kernels._build.cache_clear()


def test_batched_and_other_dtypes_bypass_the_kernel(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "gemv_bf16", lambda *a: pytest.fail("kernel called"))
    monkeypatch.setattr(cpu_gemm, "computes_in_fp32", lambda: False)  # see test_cpu_gemm for True
    monkeypatch.setattr(cpu_kernels, "few_row_kernel_applies", lambda rows: False)
    w = torch.randn(64, 128).bfloat16()
    x2 = torch.randn(2, 128).bfloat16()
    assert torch.equal(linear_2d(x2, w), F.linear(x2, w))  # batch 2: F.linear (oneDNN)
    wf, xf = torch.randn(64, 128), torch.randn(1, 128)
    assert torch.equal(linear_2d(xf, wf), F.linear(xf, wf))  # fp32: F.linear


BUILD_IN_A_CHILD = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from dstp.cpu import kernels as cpu_kernels
sys.exit(0 if cpu_kernels._build(sys.argv[1]) is not None else 1)
"""


@needs_avx2
def test_a_build_killed_midway_does_not_hang_the_next_start():
    """torch's ``lock`` file outlives a killed build; the next start must not wait on it."""
    stale = cpu_kernels._build_directory("avx2") / "lock"
    stale.touch()
    child = subprocess.run(
        [sys.executable, "-c", BUILD_IN_A_CHILD, "avx2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert "left by a kernel build that did not finish" in child.stderr
    assert not stale.exists()


BUILD_FROM_A_COPY = """
import shutil, sys
from pathlib import Path
from dstp.cpu import kernels as cpu_kernels
ext, sources, flags, needs = cpu_kernels.KERNELS["avx2"]
copies = [Path(shutil.copy(source, sys.argv[1])) for source in sources]
cpu_kernels.KERNELS["avx2"] = (ext, copies, flags, needs)
sys.exit(0 if cpu_kernels._build("avx2") is not None else 1)
"""


@needs_avx2
def test_a_second_installation_of_the_same_sources_reuses_the_build(tmp_path):
    """A wheel and a checkout hold the sources at different paths: neither rebuilds."""
    assert cpu_kernels._build("avx2") is not None
    built = sorted(cpu_kernels._build_directory("avx2").glob("*.so"))
    assert built, "the build folder should hold the built extension"
    before = [path.stat().st_mtime_ns for path in built]
    child = subprocess.run(
        [sys.executable, "-c", BUILD_FROM_A_COPY, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert [path.stat().st_mtime_ns for path in built] == before, "rebuilt from the copy"


def test_the_build_folder_follows_the_sources_not_their_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    ext, sources, flags, needs = cpu_kernels.KERNELS["avx2"]
    here = cpu_kernels._build_directory("avx2")
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    copies = [copy / source.name for source in sources]
    for source, target in zip(sources, copies, strict=True):
        target.write_bytes(source.read_bytes())
    monkeypatch.setitem(cpu_kernels.KERNELS, "avx2", (ext, copies, flags, needs))
    assert cpu_kernels._build_directory("avx2") == here
    copies[0].write_bytes(copies[0].read_bytes() + b"\n// changed\n")
    assert cpu_kernels._build_directory("avx2") != here


def test_a_stale_lock_of_another_extension_is_removed_a_fresh_one_kept(tmp_path, monkeypatch):
    """DeepSpeed's shm op uses torch's lock file too: only one older than any build goes."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / _get_build_directory("some_op", verbose=False) / "lock"
    lock.touch()
    cpu_kernels.clear_stale_extension_lock("some_op")
    assert lock.exists()  # a build may be running right now
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    cpu_kernels.clear_stale_extension_lock("some_op")
    assert not lock.exists()
    cpu_kernels.clear_stale_extension_lock("some_op")  # nothing there: nothing to do


# -- the decoder layer's fused ops (csrc/layer_ops.cpp, in both builds alike) -----------------
# Each against the plain PyTorch ops it replaces in dstp/model/fused_layers.py and the
# attention backends; paged decode attention is tested in tests/worker/test_decode_attention.py.


@pytest.fixture(scope="module")
def layer_ops():
    if not cpu_features.has_avx2_fma():
        pytest.skip("CPU without AVX2+FMA")
    ops = cpu_kernels._ops()
    assert ops is not None and hasattr(ops, "rotary_bf16"), "both builds carry the layer ops"
    return ops


def _plain_rotary(x, cos, sin):
    """dstp.model.fused_layers.rotate: ``x * cos + roll(x) * signed sin`` in three bf16 ops."""
    rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return torch.addcmul(x * cos.unsqueeze(2), rolled, sin.unsqueeze(2))


@pytest.mark.parametrize(
    "batch,tokens,q_heads,kv_heads,dim,cos_batch",
    [(1, 8, 4, 2, 64, 1), (1, 1, 8, 8, 128, 1), (2, 5, 6, 2, 32, 2), (3, 7, 3, 1, 10, 1)],
)
def test_rotary_is_the_three_plain_ops_bit_for_bit(
    layer_ops, batch, tokens, q_heads, kv_heads, dim, cos_batch
):
    """q and k heads as the fused layer hands them over: a strided view of the q/k/v output."""
    gen = torch.Generator().manual_seed(dim + tokens)
    heads = q_heads + kv_heads
    qkv = (torch.randn(batch, tokens, (heads + kv_heads) * dim, generator=gen) * 3).bfloat16()
    x = qkv[..., : heads * dim].view(batch, tokens, heads, dim)
    cos, sin = torch.randn(2, cos_batch, tokens, dim, generator=gen).bfloat16()
    got = cpu_kernels.rotary_bf16(x, cos, sin)
    assert got.is_contiguous() and torch.equal(got, _plain_rotary(x, cos, sin))
    assert not torch.equal(got, _plain_rotary(x, cos, -sin))  # the test can fail


def test_rotary_takes_fused_layers_tables(layer_ops):
    """Through the fused layer's helper, with HF's rotate_half sign folded into sin."""
    from dstp.model.fused_layers import rope_sign, rotate_heads

    x = torch.randn(1, 6, 5, 16).bfloat16()
    angles = torch.arange(6.0)[None, :, None] * torch.linspace(0.1, 1.0, 8).repeat(2)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    signed = sin * rope_sign(16, torch.bfloat16, "cpu")
    x1, x2 = x.chunk(2, dim=-1)
    hf = x * cos.unsqueeze(2) + torch.cat((-x2, x1), dim=-1) * sin.unsqueeze(2)
    got = rotate_heads(x, cos, signed)
    assert torch.allclose(got.float(), hf.float(), rtol=2**-7, atol=2**-7)


@needs_kernel
def test_silu_mul_16_lanes_equal_the_avx2_builds_8_bit_for_bit():
    """The AVX512-BF16 build runs SiLU-mul 16 lanes at a time with the AVX2 build's operations
    in the same order: the same bits for every value, specials and exp's clamps included, so a
    model's outputs do not depend on which build a CPU takes."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 2 * 1000, generator=gen) * 30).bfloat16()  # 1000: 62 x 16 + a tail
    flat = x.view(-1)
    for step, value in ((97, float("nan")), (89, float("inf")), (83, -float("inf"))):
        flat[::step] = value
    flat[::79], flat[::71], flat[::67] = -100.0, 89.0, -0.0
    wide = cpu_kernels._build("avx512_bf16").silu_mul_bf16(x)
    narrow = cpu_kernels._build("avx2").silu_mul_bf16(x)
    assert torch.equal(wide.view(torch.int16), narrow.view(torch.int16))
    assert torch.isnan(wide).any() and (wide == 0).any()  # the specials reached the output


@pytest.mark.parametrize("rows,inner", [(8, 768), (1, 203), (3, 7), (2, 4096)])
def test_silu_mul_is_the_two_plain_ops(layer_ops, rows, inner):
    gen = torch.Generator().manual_seed(inner)
    gate_up = (torch.randn(1, rows, 2 * inner, generator=gen) * 4).bfloat16()
    gate_up[0, 0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamp, signed zero
    want = F.silu(gate_up[..., :inner]) * gate_up[..., inner:]
    got = cpu_kernels.silu_mul_bf16(gate_up)
    assert got.shape == want.shape
    # exp is not ATen's: a rare value may round to the neighbouring bf16
    assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=1e-30)
    assert (got != want).float().mean() < 1e-3
    assert not torch.allclose(  # the test can fail: gate and up swapped
        cpu_kernels.silu_mul_bf16(gate_up.roll(inner, -1)).float(), want.float(), rtol=2**-7
    )


def _plain_cache_write(key, value, k_cache, v_cache, slots):
    """Token by token, in order: a slot named twice keeps the last (the scratch slot)."""
    for t, slot in enumerate(slots.tolist()):
        k_cache[:, slot] = key[:, t]
        v_cache[:, slot] = value[:, t]


@pytest.mark.parametrize("kv,dk,dv,tokens", [(2, 64, 64, 8), (1, 8, 16, 3), (4, 128, 128, 1)])
def test_cache_write_puts_each_token_at_its_slot(layer_ops, kv, dk, dv, tokens):
    """Shuffled slots, strided key/value views (as the fused layer's), and the decode buckets'
    padding rows: all of them on the scratch block's first slot."""
    gen = torch.Generator().manual_seed(dk + tokens)
    slots_total = 64
    qk = torch.randn(tokens, 3 * kv, dk, generator=gen).bfloat16()
    key = qk[:, kv : 2 * kv].transpose(0, 1)  # [KV, T, dk], strided
    value = torch.randn(tokens, kv, dv, generator=gen).bfloat16().transpose(0, 1)
    slots = torch.randperm(slots_total - 4, generator=gen)[:tokens]
    if tokens > 2:
        slots[-2:] = slots_total - 4  # two padding rows on the scratch slot
    caches = [torch.randn(kv, slots_total, d, generator=gen).bfloat16() for d in (dk, dv)]
    want = [c.clone() for c in caches]
    _plain_cache_write(key, value, *want, slots)
    assert cpu_kernels.write_kv_cache_bf16(key, value, *caches, slots)
    assert torch.equal(caches[0], want[0]) and torch.equal(caches[1], want[1])
    key[:, 0] += 1  # the test can fail
    assert cpu_kernels.write_kv_cache_bf16(key, value, *caches, slots)
    assert not torch.equal(caches[0], want[0])


def test_cache_write_refuses_a_slot_outside_the_cache(layer_ops):
    key = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
    cache = torch.zeros(1, 4, 8, dtype=torch.bfloat16)
    for bad in (4, -1):
        with pytest.raises(RuntimeError, match="outside the cache"):
            cpu_kernels.write_kv_cache_bf16(key, key, cache, cache.clone(), torch.tensor([0, bad]))


def test_layer_ops_fall_back_where_the_build_lacks_them(monkeypatch):
    """Each wrapper answers None / False, and its caller runs the plain ops."""
    from dstp.model.fused_layers import rotate_heads, silu_mul

    monkeypatch.setattr(cpu_kernels, "_ops", lambda: None)
    x, cos = torch.randn(1, 3, 2, 8).bfloat16(), torch.randn(1, 3, 8).bfloat16()
    assert cpu_kernels.rotary_bf16(x, cos, cos) is None
    assert cpu_kernels.silu_mul_bf16(x) is None
    assert not cpu_kernels.write_kv_cache_bf16(x[0], x[0], x[0], x[0], torch.arange(3))
    assert torch.equal(rotate_heads(x, cos, cos), _plain_rotary(x, cos, cos))
    assert torch.equal(silu_mul(x.flatten(2), 8), F.silu(x.flatten(2)[..., :8]) * x[..., 1, :])


@needs_kernel
def test_with_amx_onednn_takes_rows_from_8_without_dstp_amx_gemm(avx512_bf16, monkeypatch):
    """Where oneDNN's bf16 GEMM runs on AMX tiles (and settle kept it) but dstp's AMX GEMM
    cannot run (a build or OS without it), oneDNN beat the few-row kernels from 8 rows with
    the weights from DRAM (0.55x at 16, 0.29x at 64): they keep 2-7 rows, oneDNN the rest.
    Where linears widen to fp32 the AMX flag changes nothing."""
    calls = []
    real_few = cpu_kernels.gemm_few_bf16
    monkeypatch.setattr(
        cpu_kernels, "gemm_few_bf16", lambda x, *a: calls.append(x.shape[0]) or real_few(x, *a)
    )
    monkeypatch.setattr(cpu_features, "flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    monkeypatch.setattr(cpu_gemm, "_measured_fp32", False)  # settle kept oneDNN's bf16 GEMM
    monkeypatch.setattr(cpu_kernels._ops(), "amx_ready", False)
    limit = cpu_kernels.ONEDNN_AMX_ROW_LIMIT
    assert cpu_kernels.few_row_limit() == limit
    w = torch.randn(64, 128).bfloat16()
    for rows in (2, limit - 1, limit, 32):
        x = torch.randn(rows, 128).bfloat16()
        got = linear_2d(x, w)
        if rows >= limit:
            assert torch.equal(got, F.linear(x, w))  # oneDNN's own
    assert calls == [2, limit - 1]
    assert cpu_kernels.describe_paths()[f"{limit}+ rows"].startswith("oneDNN")
    monkeypatch.setattr(cpu_gemm, "_setting", "float32")  # widening: the fp32 hand-overs
    assert cpu_kernels.few_row_limit() > limit


@needs_kernel
def test_with_amx_dstp_amx_gemm_takes_4_to_191_rows(avx512_bf16, monkeypatch):
    """With AMX and dstp's AMX GEMM ready: the few-row kernel keeps 2-3 rows, the AMX GEMM
    4-191 of weights its tiles cover (rows a multiple of 16, columns of 32), oneDNN the rest;
    where linears widen to fp32, or ``--cpu-compute-dtype bfloat16`` asks for oneDNN, none. (Runs on any AVX512-BF16 host: the AMX call is
    recorded, and answered by oneDNN.)"""
    few, amx = [], []
    real_few = cpu_kernels.gemm_few_bf16
    monkeypatch.setattr(
        cpu_kernels, "gemm_few_bf16", lambda x, *a: few.append(x.shape[0]) or real_few(x, *a)
    )
    monkeypatch.setattr(
        cpu_kernels, "gemm_amx_bf16", lambda x, w, b: amx.append(x.shape) or F.linear(x, w, b)
    )
    monkeypatch.setattr(cpu_features, "flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    monkeypatch.setattr(cpu_gemm, "_measured_fp32", False)
    monkeypatch.setattr(cpu_kernels._ops(), "amx_ready", True)
    low, high = cpu_kernels.AMX_ROW_LIMIT, cpu_kernels.AMX_GEMM_ROW_LIMIT
    assert cpu_kernels.few_row_limit() == low
    for rows in (2, low - 1, low, 64, high - 1, high):
        linear_2d(torch.randn(rows, 128).bfloat16(), torch.randn(48, 128).bfloat16())
    assert few == [2, low - 1]
    assert amx == [(low, 128), (64, 128), (high - 1, 128)]
    for n, k in ((40, 128), (48, 80)):  # not whole tiles: oneDNN
        linear_2d(torch.randn(8, k).bfloat16(), torch.randn(n, k).bfloat16())
    assert len(amx) == 3
    paths = cpu_kernels.describe_paths()
    assert paths[f"{low}-{high - 1} rows"] == "dstp AMX GEMM (plain weights)"
    assert paths[f"{high}+ rows"].startswith("oneDNN")
    for setting in ("float32", "bfloat16"):  # widened, or oneDNN's GEMM asked for everywhere
        monkeypatch.setattr(cpu_gemm, "_setting", setting)
        linear_2d(torch.randn(8, 128).bfloat16(), torch.randn(48, 128).bfloat16())
        assert len(amx) == 3
        assert f"{low}-{high - 1} rows" not in cpu_kernels.describe_paths()


needs_amx = pytest.mark.skipif(
    not (cpu_features.has_amx_bf16() and cpu_kernels.amx_gemm_ready()),
    reason="CPU, build or OS without AMX tiles",
)


@needs_amx
@pytest.mark.parametrize(
    "m,n,k,bias",
    [
        (4, 16, 32, False),  # one tile each way, x padded from 4 rows to 16
        (17, 48, 64, True),  # an x block of one row; three weight blocks (a pair and one)
        (33, 1536, 2048, True),  # three x blocks: a pair and one alone
        (127, 80, 2080, False),  # two K passes (2,048 + 32 columns); 8 x blocks
        (200, 32, 96, True),  # 13 x blocks, the last of 8 rows (called directly)
        (150, 48, 8192, True),  # chunks of 64 rows at this K: 64, 64 and 22 (called directly)
    ],
)
def test_amx_gemm_matches_fp32_math_rounded_once(m, n, k, bias):
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = cpu_kernels.gemm_amx_bf16(x, w, b)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    tol = exact.abs() * 2**-8 + 1e-4 * exact.abs().max()  # half a bf16 step, plus fp32 sums
    assert ((got.double() - exact).abs() <= tol).all()
    assert (got == exact.bfloat16()).double().mean() >= 0.95


@needs_amx
def test_amx_gemm_rounds_to_nearest_even_and_keeps_specials():
    """Exact sums (small integers times powers of two), so the only error is the one rounding
    to bf16 in the tiles' transposed store: ties go to even both ways, 0 * inf is NaN, the bias
    is added before rounding; in every row of a partial x block and both weight blocks."""
    k, rows = 64, 5
    x = torch.zeros(rows, k).bfloat16()
    x[:, 0], x[:, 40] = 1.0, 2.0**-8
    w = torch.zeros(32, k).bfloat16()
    w[:, 0] = torch.tensor([1.0, 1.0, 1.0 + 2**-7, 3.0] * 8)
    w[:, 40] = torch.tensor([1.0, 3.0, 1.0, 1.0] * 8)
    w[21, 5] = float("inf")
    bias = torch.zeros(32).bfloat16()
    bias[16:20] = 2.0**-7  # moves the second block's sums off the ties
    exact = F.linear(x.float(), w.float(), bias.float())
    got = cpu_kernels.gemm_amx_bf16(x, w, bias)
    finite = torch.ones(32, dtype=torch.bool)
    finite[21] = False
    assert torch.equal(got[:, finite], exact[:, finite].bfloat16())
    assert torch.isnan(got[:, 21]).all()
    assert got[0, 0].item() == 1.0 and got[0, 1].item() == 1.0 + 2**-6  # ties: down, up


@needs_amx
def test_amx_gemm_rows_do_not_depend_on_their_batch():
    """A row's sums run over K in the same order whatever rows share its call: a sequence's
    logits in the AMX GEMM's range do not change with the decode batch around it."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(100, 256, generator=gen).bfloat16()
    w = torch.randn(64, 256, generator=gen).bfloat16()
    whole = cpu_kernels.gemm_amx_bf16(x, w, None)
    for rows in (4, 17, 63):
        assert torch.equal(cpu_kernels.gemm_amx_bf16(x[:rows], w, None), whole[:rows])


@needs_amx
def test_amx_gemm_refuses_what_its_tiles_do_not_cover():
    x = torch.randn(8, 48).bfloat16()
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_kernels.gemm_amx_bf16(x, torch.randn(16, 48).bfloat16(), None)
    with pytest.raises(RuntimeError, match="bf16 inputs only"):
        cpu_kernels.gemm_amx_bf16(x.float(), torch.randn(16, 48), None)


@needs_amx
def test_amx_gemm_and_onednn_take_turns_on_the_tiles():
    """oneDNN's bf16 GEMM configures the same AMX tiles its own way: calls alternating on one
    thread each load their own configuration, and both stay right."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 512, generator=gen).bfloat16()
    w = torch.randn(96, 512, generator=gen).bfloat16()
    exact = F.linear(x.double(), w.double())
    tol = exact.abs() * 2**-8 + 1e-4 * exact.abs().max()
    for _ in range(3):
        for got in (cpu_kernels.gemm_amx_bf16(x, w, None), F.linear(x, w)):
            assert ((got.double() - exact).abs() <= tol).all()
