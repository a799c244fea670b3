"""dstp's one-call RMSNorm: HF's rounding, swapped in only where it reproduces HF's module."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from dstp.cpu import features as cpu_features
from dstp.cpu import kernels as cpu_kernels
from dstp.model import norms
from dstp.model.norms import FusedRMSNorm, fused_replacements

needs_kernel = pytest.mark.skipif(
    not (cpu_features.has_avx2_fma() or cpu_features.has_avx512_bf16()),
    reason="dstp's CPU kernels need AVX2+FMA or AVX512-BF16",
)


def _hf_norm(width: int, eps: float = 1e-5, seed: int = 0) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(width, eps=eps).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(seed))
    return norm


def _assert_within_rounding(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal but for rare one-ulp flips (only the mean's summation order differs)."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    differ = ours != theirs
    assert differ.float().mean().item() <= norms.MAX_MISMATCH
    gap = (ours.float() - theirs.float()).abs()[differ]
    assert bool((gap <= theirs.float().abs()[differ] * 2**-7 + 1e-30).all())


class OnePlusRMSNorm(nn.Module):
    """Gemma's form: scales by 1 + weight, so dstp's kernel must not replace it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width, dtype=torch.bfloat16))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return (wide * (1.0 + self.weight.float())).to(x.dtype)


@needs_kernel
@pytest.mark.parametrize(
    "shape, scale, eps",
    [
        ((1, 2048), 1.0, 1e-5),
        ((5, 64), 30.0, 1e-6),
        ((2, 3, 200), 1e-3, 1e-5),
        ((33, 17), 3.0, 0.1),
    ],
)
def test_the_kernel_rounds_as_hf_llama_rms_norm(shape, scale, eps):
    norm = _hf_norm(shape[-1], eps)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * scale).bfloat16()
    ours = cpu_kernels.rms_norm_bf16(x, norm.weight, norm.variance_epsilon)
    with torch.no_grad():
        _assert_within_rounding(ours, norm(x))


@needs_kernel
def test_rows_split_over_threads_come_out_the_same():
    norm = _hf_norm(96)
    x = torch.randn(301, 96, generator=torch.Generator().manual_seed(2)).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        split = cpu_kernels.rms_norm_bf16(x, norm.weight, norm.variance_epsilon)
        torch.set_num_threads(1)
        whole = cpu_kernels.rms_norm_bf16(x, norm.weight, norm.variance_epsilon)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, whole)
    with torch.no_grad():
        _assert_within_rounding(whole, norm(x))


@needs_kernel
def test_only_norms_the_kernel_reproduces_are_swapped():
    model = nn.Module()
    model.llama = _hf_norm(64)
    model.gemma_like = OnePlusRMSNorm(64)
    model.float32 = LlamaRMSNorm(64)
    model.not_a_norm = nn.LayerNorm(64).to(torch.bfloat16)
    swapped = dict(fused_replacements(model))
    assert list(swapped) == ["llama"]
    assert swapped["llama"].weight is model.llama.weight  # shares the loaded weight, no copy


@needs_kernel
def test_inputs_the_kernel_does_not_take_get_hf_math():
    norm = _hf_norm(48)
    fused = FusedRMSNorm(norm.weight, norm.variance_epsilon)
    x = torch.randn(6, 96).bfloat16()[:, ::2]  # not contiguous
    with torch.no_grad():
        assert torch.equal(fused(x), norm(x))
    wide = LlamaRMSNorm(48)
    with torch.no_grad():
        wide.weight.normal_()
    fused_wide = FusedRMSNorm(wide.weight, wide.variance_epsilon)
    x32 = torch.randn(3, 48, requires_grad=True)
    fused_wide(x32).sum().backward()  # autograd through HF's math
    assert x32.grad is not None and torch.equal(fused_wide(x32), wide(x32))


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    from tests.helpers.tiny_models import llama_config, save_random_model

    config = llama_config(num_attention_heads=8, num_key_value_heads=2, vocab_size=256)
    return save_random_model(config, tmp_path_factory.mktemp("norms") / "model")


def _engine_logprob_error(path, monkeypatch, fuse: bool) -> tuple[float, int]:
    """Worst |logprob - HF's| over 12 greedy tokens of 3 prompts, and the kernel calls made."""
    from dstp.engine.llm_engine import Engine, EngineConfig
    from tests.helpers.hf_reference import worst_greedy_logprob_error

    if not fuse:
        monkeypatch.setattr("dstp.model.inject.fused_replacements", lambda model: iter(()))
    calls = []
    for kernel in ("rms_norm_bf16", "add_rms_norm_bf16"):  # the fused layers add and norm in one
        real = getattr(cpu_kernels, kernel)
        monkeypatch.setattr(cpu_kernels, kernel, lambda *a, real=real: calls.append(1) or real(*a))
    engine = Engine(EngineConfig(model=str(path), dtype="bfloat16", num_blocks=64))
    fused = [m for m in engine.runner.model.modules() if isinstance(m, FusedRMSNorm)]
    assert len(fused) == (5 if fuse else 0)  # 2 per layer and the final norm
    prompts = [[5, 9, 33, 7], [1, *range(40, 70)], [3, 3]]
    return worst_greedy_logprob_error(engine, path, prompts), len(calls)


@needs_kernel
def test_a_bf16_engine_runs_its_norms_in_the_kernel_as_close_to_hf(bf16_llama, monkeypatch):
    fused_error, calls = _engine_logprob_error(bf16_llama, monkeypatch, fuse=True)
    with monkeypatch.context() as unfused:
        hf_error, none = _engine_logprob_error(bf16_llama, unfused, fuse=False)
    assert calls >= 5 * 12 and none == 0
    assert fused_error <= hf_error + 1e-3, (fused_error, hf_error)
