"""The CUDA backend: PyTorch SDPA for prefill, a Triton kernel for batched decode.

The decode kernel (:mod:`.triton_paged`) reads each sequence's keys and values in place
through its block table: one kernel a layer where :mod:`.sdpa` gathers the blocks into new
tensors and runs ~14. Triton comes with PyTorch's CUDA builds. Before a device gets the
kernel, :func:`backend` runs it once on a seeded case against SDPA's decode (as a fused
layer is probed against HF's): where it raises or differs, where Triton is missing, or
with ``DSTP_TRITON_DECODE=0``, decode goes through SDPA's path, and the log says why. A
layer the kernel does not take (:func:`.triton_paged.fits`) goes through SDPA's path too.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from dstp.worker.attention.backends import LayerAttention
from dstp.worker.attention.backends.sdpa import BACKEND as SDPA
from dstp.worker.attention.backends.sdpa import SdpaBackend
from dstp.worker.attention.metadata import AttentionMetadata

log = logging.getLogger("dstp")

try:
    from dstp.worker.attention.backends import triton_paged
except ImportError as exc:  # a torch build without Triton
    log.info("no Triton (%s): CUDA decode attention gathers blocks for SDPA", exc)
    triton_paged = None


class CudaBackend(SdpaBackend):
    name = "cuda (Triton paged decode kernel, SDPA prefill)"

    def _decode_output(
        self,
        query: torch.Tensor,
        v_dim: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        step: AttentionMetadata,
        layer: LayerAttention,
    ) -> torch.Tensor:
        if step.decode_seqs and triton_paged.fits(query, k_cache, v_cache):
            out = triton_paged.paged_decode_attention(
                query,
                k_cache,
                v_cache,
                step.decode_rows,
                step.decode_blocks,
                step.decode_lens,
                step.cache.shape.block_size,
                layer.scaling,
                layer.softcap or 0.0,
                layer.sliding_window or 0,
            )
            return out.transpose(0, 1)  # [H, T, dv]; prefill rows are the caller's to fill
        return super()._decode_output(query, v_dim, k_cache, v_cache, step, layer)


BACKEND = CudaBackend()


def backend(device: torch.device) -> SdpaBackend:
    """The device's backend: :data:`BACKEND` where the kernel passed its check there."""
    problem = _kernel_problem(str(device))
    if problem is None:
        return BACKEND
    log.warning("CUDA decode attention through SDPA's gathers, not the Triton kernel: %s", problem)
    return SDPA


@functools.cache
def _kernel_problem(device: str) -> str | None:
    """Why the Triton kernel will not serve on ``device``; None where, on a seeded case
    (GQA, two sequences across key tiles and key splits, bf16), it gives SDPA's decode
    (computed in fp32, as the kernel sums)."""
    if os.environ.get("DSTP_TRITON_DECODE", "1") == "0":
        return "DSTP_TRITON_DECODE=0"
    if triton_paged is None:
        return "Triton is not installed"
    gen = torch.Generator().manual_seed(0)
    block_size, blocks = 16, 64
    k_cache, v_cache = (
        torch.randn(2, blocks * block_size, 64, generator=gen).to(torch.bfloat16) for _ in "kv"
    )
    args = [
        torch.randn(8, 3, 64, generator=gen).to(torch.bfloat16),  # 8 query heads, 3 rows
        k_cache,
        v_cache,
        torch.tensor([0, 2]),  # the decoding rows
        torch.randperm(blocks, generator=gen).view(2, 32),  # their block tables
        torch.tensor([37, 500]),  # their contexts: the keys in two splits (key_splits)
    ]
    args = [a.to(device) for a in args] + [block_size, 0.125, 0.0, 0]
    try:
        error = triton_paged.error_vs_reference(*args)  # once, at start-up
    except Exception as exc:  # a Triton or driver that cannot build or run it
        return f"it raised {type(exc).__name__}: {exc}"
    if not error <= 2e-2:  # bf16 outputs near 1: a rounding or two
        return f"it differs from SDPA's decode by {error:.3g} on a seeded case"
    return None
