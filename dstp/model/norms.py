"""Llama-form RMSNorm modules swapped for one kernel call on CPU (bf16).

HF's ``LlamaRMSNorm`` is eight ATen ops a call, ~33 calls a decode step, each
starting cold after a long GEMV on CPU (benchmarks/FINDINGS.md). dstp's kernel
rounds as HF's module does. Which modules qualify is checked, not assumed: a
class named ``*RMSNorm`` with ``weight`` and ``variance_epsilon`` is swapped
only if the kernel reproduces its output on a probe input, so a variant with
other math (Gemma's ``1 + weight``) keeps HF's forward.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from dstp.cpu import kernels as cpu_kernels

log = logging.getLogger("dstp")

PROBE_ROWS = 4
MAX_MISMATCH = 1e-3  # fraction of probe outputs allowed one bf16 ulp apart (summation order)


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama's RMSNorm math, for inputs the kernel does not take."""
    dtype = x.dtype
    wide = x.to(torch.float32)
    wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * wide.to(dtype)


class FusedRMSNorm(nn.Module):
    """A verified Llama-form RMSNorm: dstp's kernel for bf16 CPU inputs, HF's math otherwise."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._kernel_takes(hidden_states):
            out = cpu_kernels.rms_norm_bf16(hidden_states, self.weight, self.variance_epsilon)
            if out is not None:
                return out
        return llama_rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return (
            x.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and x.is_contiguous()
            and self.weight.dtype == torch.bfloat16
            and not needs_grad
        )

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


def fused_replacements(model: nn.Module) -> Iterator[tuple[str, FusedRMSNorm]]:
    """(name, replacement) for every RMSNorm in ``model`` the kernel reproduces."""
    verdicts: dict[type, bool] = {}
    for name, module in model.named_modules():
        if not _looks_like_rms_norm(module):
            continue
        kind = type(module)
        if kind not in verdicts:
            verdicts[kind] = _kernel_reproduces(module)
            if not verdicts[kind]:
                log.info(
                    "%s does not compute like Llama's RMSNorm: HF's forward kept", kind.__name__
                )
        if verdicts[kind]:
            yield name, FusedRMSNorm(module.weight, float(module.variance_epsilon))


def _looks_like_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "variance_epsilon", None), float)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
    )


@torch.no_grad()
def _kernel_reproduces(module: nn.Module) -> bool:
    """Whether the kernel gives ``module``'s own output on a seeded probe input."""
    width = module.weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    probe = (torch.randn(PROBE_ROWS, width, generator=generator) * 3).to(torch.bfloat16)
    ours = cpu_kernels.rms_norm_bf16(probe, module.weight, float(module.variance_epsilon))
    if ours is None:
        return False
    theirs = module(probe)
    if theirs.shape != ours.shape or theirs.dtype != ours.dtype:
        return False
    return (theirs != ours).float().mean().item() <= MAX_MISMATCH
