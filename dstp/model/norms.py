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
from typing import Any

import torch
from torch import nn

from dstp.cpu import kernels as cpu_kernels
from dstp.distributed import TPGroup
from dstp.model.layers import Partition, empty_param, partition_for

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


class ColumnParallelNorm(nn.Module):
    """An RMSNorm over the full width of a column-split activation (policy style ``ShardedNorm``).

    This rank holds ``partition`` of the width (the column layer's slice) and
    of the weight. Its fp32 sum of squares is all-reduced (one number per
    token) and divided by ``tp.size * local width``: the full width when each
    unit lives on one rank, and also when every unit is replicated on the
    same number of ranks (KV heads under GQA replication), whose sums then
    count each element that many times over a width as many times larger.
    """

    def __init__(
        self,
        partition: Partition,
        eps: float,
        tp: TPGroup,
        *,
        cast_before_weight: bool = False,
        dtype: torch.dtype | None = None,
        device: Any = "meta",
    ) -> None:
        super().__init__()
        self.tp = tp
        self.partition = partition
        self.eps = eps
        self.cast_before_weight = cast_before_weight
        self.weight = empty_param((partition.local_size,), dtype, device)
        self.weight.weight_loader = self.load_weight
        self.counted_width = tp.size * partition.local_size

    def load_weight(self, param: torch.Tensor, source: Any) -> None:
        self.partition.read_into(param.data, source, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        wide = x.to(torch.float32)
        squares = self.tp.all_reduce(wide.pow(2).sum(-1, keepdim=True))
        wide = wide * torch.rsqrt(squares / self.counted_width + self.eps)
        if self.cast_before_weight:
            return self.weight * wide.to(dtype)
        return (self.weight * wide).to(dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.partition.local_size}/{self.partition.full_size}, eps={self.eps}, "
            f"tp={self.tp.size}"
        )


def column_parallel_norm(
    module: nn.Module, style: Any, heads: Any, tp: TPGroup, dtype: torch.dtype | None
) -> ColumnParallelNorm:
    """The :class:`ColumnParallelNorm` for HF norm ``module`` under a ``ShardedNorm`` style."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        raise ValueError(
            f"ShardedNorm needs an RMSNorm with a 1D weight and an eps, not {type(module).__name__}"
        )
    part = partition_for(style.parts, weight.shape[0], heads, tp.rank, tp.size)
    return ColumnParallelNorm(
        part, eps, tp, cast_before_weight=style.cast_before_weight, dtype=dtype
    )
