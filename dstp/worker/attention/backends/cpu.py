"""The CPU backend: PyTorch SDPA for prefill, dstp's kernels for the cache write and batched decode.

A decode step attends G query heads per KV head to each sequence's keys: tiny matmuls
that PyTorch runs one by one, after copying every sequence's blocks out of the cache
(benchmarks/FINDINGS.md), around a softmax and two casts. dstp's
``decode_attention_bf16`` (``dstp/cpu/csrc/decode_attention.cpp``) reads each sequence's keys
and values in place through its block table and computes scores, softmax (softcap and
sliding window as in :mod:`.sdpa`) and values in one call, in fp32, writing each
decoding token's bf16 output row; ``write_kv_cache_bf16`` writes the step's new K and V
in one call where PyTorch takes two ``index_copy_``. They take bf16 caches with head
dims that are multiples of 8 and up to 16 query heads per KV head; anything else, or a
CPU without dstp's kernels, goes to :mod:`.sdpa`.
"""

from __future__ import annotations

import torch

from dstp.cpu import kernels as cpu_kernels
from dstp.worker.attention.backends import LayerAttention
from dstp.worker.attention.backends.sdpa import SdpaBackend
from dstp.worker.attention.metadata import AttentionMetadata

MAX_GROUP = 16  # query heads per KV head the kernel takes


def fits(query: torch.Tensor, cache: torch.Tensor, v_cache: torch.Tensor | None = None) -> bool:
    """Whether the decode kernel takes this layer's query, shapes and cache dtype."""
    heads, kv, dim = query.shape[0], cache.shape[0], cache.shape[-1]
    v_dim = dim if v_cache is None else v_cache.shape[-1]
    return (
        query.dtype == cache.dtype == torch.bfloat16
        and query.stride(-1) == 1
        and dim % 8 == 0
        and v_dim % 8 == 0
        and heads // kv <= MAX_GROUP
    )


def _bf16(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.bfloat16 and t.stride(-1) == 1 for t in tensors)


class CpuBackend(SdpaBackend):
    name = "cpu (dstp paged decode kernel, SDPA prefill)"

    @staticmethod
    def _write_cache(
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        step: AttentionMetadata,
    ) -> None:
        # bf16 first: asking for the kernels builds them, which a float32 model never needs
        if not (
            _bf16(key, value, k_cache, v_cache)
            and cpu_kernels.write_kv_cache_bf16(key, value, k_cache, v_cache, step.slot_mapping)
        ):
            SdpaBackend._write_cache(key, value, k_cache, v_cache, step)

    def _decode_output(
        self,
        query: torch.Tensor,
        v_dim: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        step: AttentionMetadata,
        layer: LayerAttention,
    ) -> torch.Tensor:
        if step.decode_seqs and fits(query, k_cache, v_cache):
            out = cpu_kernels.decode_attention_bf16(
                query,
                k_cache,
                v_cache,
                step.decode_rows.contiguous(),
                step.decode_blocks.contiguous(),
                step.decode_lens.contiguous(),
                step.cache.shape.block_size,
                layer.scaling,
                layer.softcap,
                layer.sliding_window,
            )
            if out is not None:  # [T, H, dv]: the caller's transpose back is contiguous
                return out.transpose(0, 1)
        return super()._decode_output(query, v_dim, k_cache, v_cache, step, layer)


BACKEND = CpuBackend()
