"""The CPU backend: PyTorch SDPA for prefill, dstp's paged kernel for batched decode.

A decode step attends G query heads per KV head to each sequence's keys: tiny matmuls
that PyTorch runs one by one, after copying every sequence's blocks out of the cache
(benchmarks/FINDINGS.md). ``dstp/cpu/csrc/decode_attention_avx2.cpp`` reads each sequence's
keys and values in place through its block table instead, in two passes; the softmax
(with softcap and sliding window, as in :mod:`.sdpa`) stays in PyTorch between them.
It takes bf16 caches with head dims that are multiples of 8 and up to 16 query heads
per KV head, with K and V of one head size; anything else (DeepSeek's MLA: K 192, V 128),
or a CPU without dstp's kernels, goes to :mod:`.sdpa`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from dstp.cpu import kernels as cpu_kernels
from dstp.worker.attention.backends import LayerAttention
from dstp.worker.attention.backends.sdpa import SdpaBackend, decode_keys_visible
from dstp.worker.attention.metadata import AttentionMetadata

MAX_GROUP = 16  # query heads per KV head the kernel takes


def fits(query: torch.Tensor, cache: torch.Tensor, v_cache: torch.Tensor | None = None) -> bool:
    """Whether the kernel takes this layer's shapes and cache dtype.

    It takes one head dim for K and V: a V cache of another head size goes to SDPA.
    """
    heads, kv, dim = query.shape[0], cache.shape[0], cache.shape[-1]
    if v_cache is not None and v_cache.shape[-1] != dim:
        return False
    return cache.dtype == torch.bfloat16 and dim % 8 == 0 and heads // kv <= MAX_GROUP


def paged_decode(
    ops: ModuleType,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    step: AttentionMetadata,
    layer: LayerAttention,
) -> torch.Tensor:
    """``[H, D, d]`` attention outputs of the step's decoding sequences, in fp32 throughout."""
    bs = step.cache.shape.block_size
    blocks = step.decode_blocks.contiguous()
    lens = step.decode_lens.contiguous()
    q = query.index_select(1, step.decode_rows).float()  # [H, D, d]
    scores = ops.decode_scores_bf16(
        q, k_cache, blocks, lens, bs, blocks.shape[1] * bs, layer.scaling
    )
    if not layer.plain:
        if layer.softcap is not None:
            scores = torch.tanh(scores / layer.softcap) * layer.softcap
        hidden = ~decode_keys_visible(step, layer.sliding_window)[None, :, None, :]
        scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return ops.decode_values_bf16(probs, v_cache, blocks, lens, bs).to(query.dtype)


class CpuBackend(SdpaBackend):
    name = "cpu (dstp paged decode kernel, SDPA prefill)"

    def _decode_batch(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        step: AttentionMetadata,
        layer: LayerAttention,
    ) -> torch.Tensor:
        # fits() first: asking for the ops builds them, which a float32 model never needs
        ops = cpu_kernels.decode_attention_ops() if fits(query, k_cache, v_cache) else None
        if ops is None:
            return super()._decode_batch(query, k_cache, v_cache, step, layer)
        return paged_decode(ops, query, k_cache, v_cache, step, layer)


BACKEND = CpuBackend()
