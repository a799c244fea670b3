"""dstp's single-row bf16 GEMV matches PyTorch's, and falls back cleanly without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dstp import cpu_kernels
from dstp.cpu_kernels import _aten_cpu_kernels, linear_2d

needs_kernel = pytest.mark.skipif(
    not cpu_kernels._cpu_has_avx512_bf16(), reason="CPU without AVX512-BF16"
)


@needs_kernel
def test_kernel_builds_where_the_cpu_supports_it():
    assert cpu_kernels.available()


@needs_kernel
@pytest.mark.parametrize(
    "n,k,bias",
    [(4096, 2048, False), (1023, 2048, True), (7, 100, True), (5, 31, False), (4, 32, True)],
)
def test_matches_pytorch_within_bf16_rounding(n, k, bias):
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
    assert torch.allclose(got.float(), F.linear(x, w, b).float(), rtol=2**-7, atol=1e-2)


@needs_kernel
def test_linear_2d_uses_the_kernel_for_single_rows(monkeypatch):
    calls = []
    real = cpu_kernels.gemv_bf16
    monkeypatch.setattr(cpu_kernels, "gemv_bf16", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(64, 128).bfloat16()
    linear_2d(torch.randn(1, 1, 128).bfloat16(), w)  # batch-1 decode: the kernel
    linear_2d(torch.randn(1, 3, 128).bfloat16(), w)  # three rows: oneDNN
    assert calls == [1]


def test_switched_off_falls_back_to_pytorch(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    cpu_kernels._ops.cache_clear()
    try:
        assert (
            cpu_kernels.gemv_bf16(torch.ones(1, 8).bfloat16(), torch.ones(4, 8).bfloat16()) is None
        )
        x, w = torch.randn(1, 1, 128).bfloat16(), torch.randn(64, 128).bfloat16()
        with _aten_cpu_kernels():  # ATen's GEMV, the fallback
            expected = F.linear(x, w)
        assert torch.equal(linear_2d(x, w), expected)
    finally:
        cpu_kernels._ops.cache_clear()
