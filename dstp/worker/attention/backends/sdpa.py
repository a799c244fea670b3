"""The default attention backend: PyTorch's SDPA and two matmuls, on any device.

Prefill chunks go through ``F.scaled_dot_product_attention`` one sequence at a
time; decode tokens (one new token per sequence) are batched into one grouped
matmul over whole gathered blocks (in groups of sequences past a byte cap, so long
contexts cannot gather gigabytes per layer). It is the fallback on devices without a
backend of their own, and :mod:`.cpu` builds on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dstp.worker.attention.backends import LayerAttention
from dstp.worker.attention.cache_write import write_kv_cache
from dstp.worker.attention.metadata import AttentionMetadata


def _fresh_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float
) -> torch.Tensor:
    """A sequence's first chunk: plain causal attention over its own new tokens."""
    # 4-D inputs reach the fused (flash) CPU kernel; 3-D ones do not (5-10x slower).
    out = F.scaled_dot_product_attention(
        q[None],
        k[None],
        v[None],
        is_causal=True,
        scale=scaling,
        enable_gqa=q.shape[0] != k.shape[0],
    )
    return out[0]


def _continued_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, offset: int
) -> torch.Tensor:
    """Later chunks (and lone decode tokens): query i sees keys <= offset + i.

    The query heads that share a KV head are folded into the query length
    (``[KV, G * q_len, d]``), so the call needs neither ``enable_gqa`` nor
    expanded K/V: SDPA's mask-capable fused kernels (memory-efficient on
    CUDA, flash on CPU) accept it, where a mask with ``enable_gqa`` falls back
    to the math kernel on CUDA.
    """
    heads, q_len, dim = q.shape
    kv = k.shape[0]
    groups = heads // kv
    mask = None
    if q_len > 1:  # one token sees its whole context
        rows = torch.arange(q_len, device=q.device).unsqueeze(1) + offset
        mask = (torch.arange(k.shape[-2], device=q.device) <= rows).repeat(groups, 1)
    folded = q.reshape(kv, groups * q_len, dim)
    out = F.scaled_dot_product_attention(
        folded[None], k[None], v[None], attn_mask=mask, scale=scaling
    )
    # CUDA's memory-efficient kernel returns it strided: reshape copies only then
    return out[0].reshape(heads, q_len, v.shape[-1])


def _masked_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    offset: int,
    softcap: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """Soft-capped or windowed attention (Gemma 2 and friends): explicit scores."""
    q_len, ctx = q.shape[-2], k.shape[-2]
    rows = torch.arange(q_len, device=q.device).unsqueeze(1) + offset
    keys = torch.arange(ctx, device=q.device).unsqueeze(0)
    allowed = keys <= rows
    if sliding_window is not None:
        allowed &= keys > rows - sliding_window
    groups = q.shape[0] // k.shape[0]
    scores = torch.matmul(q, k.repeat_interleave(groups, 0).transpose(-1, -2)).float() * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.matmul(probs.to(v.dtype), v.repeat_interleave(groups, 0))


def _decode(
    q: torch.Tensor,  # [H, D, dk]: one new token per sequence
    k: torch.Tensor,  # [KV, D, ctx, dk]
    v: torch.Tensor,  # [KV, D, ctx, dv]
    valid: torch.Tensor,  # [D, ctx] keys each sequence may see
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Batched single-token attention, grouping query heads per KV head; returns [H, D, dv].

    Faster on CPU than SDPA with a mask and ``enable_gqa`` for decode shapes
    (benchmarks/FINDINGS.md), and it never expands K/V to the query head count. K and V
    arrive head-major and contiguous (gathered block by block from the cache),
    so both matmuls run on them in place.
    """
    heads, d_seqs, dim = q.shape
    kv = k.shape[0]
    grouped = q.view(kv, heads // kv, d_seqs, dim).transpose(1, 2)  # [KV, D, G, d]
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * scaling  # [KV, D, G, ctx]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = torch.where(valid[None, :, None, :], scores, float("-inf"))  # one op, not two
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [KV, D, G, dv]
    return out.transpose(1, 2).reshape(heads, d_seqs, v.shape[-1])


# The most bytes one layer gathers for batched decode at once (K/V padded to the longest
# context, and the fp32 scores): past it the decoding sequences go in groups. At 128K
# contexts and 64 sequences the whole batch would gather ~4.5 GiB a layer on a TP=8 rank
# (Llama-70B); grouped, ~0.5 GiB. Short contexts stay one group.
DECODE_GROUP_BYTES = 512 * 2**20


def decode_seq_bytes(
    ctx: int, kv_heads: int, heads: int, k_head_dim: int, v_head_dim: int, dtype_bytes: int
) -> int:
    """What one decoding sequence adds to a group: its K/V gathered to ``ctx`` keys, and two
    fp32 score tensors over them (the scores and their masked / softmaxed copy)."""
    return ctx * kv_heads * (k_head_dim + v_head_dim) * dtype_bytes + 2 * heads * ctx * 4


def decode_group_size(num_seqs: int, seq_bytes: int) -> int:
    """Sequences per decode group: all of them while they fit :data:`DECODE_GROUP_BYTES`."""
    return max(1, min(num_seqs, DECODE_GROUP_BYTES // max(1, seq_bytes)))


def decode_keys_visible(step: AttentionMetadata, sliding_window: int | None) -> torch.Tensor:
    """``[D, B * block_size]``: the keys each decoding sequence attends to (its window's)."""
    return in_window(step.decode_valid, step.decode_lens, sliding_window)


def in_window(valid: torch.Tensor, lens: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """``valid [D, keys]`` less the keys before each sequence's last ``sliding_window``
    (its context length in ``lens [D]``; None: every key)."""
    if sliding_window is None:
        return valid
    keys = torch.arange(valid.shape[-1], device=valid.device)
    return valid & (keys >= lens.unsqueeze(1) - sliding_window)


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[KV, slots, d]`` cache -> ``[KV, D, B * block_size, d]`` for ``[D, B]`` block tables."""
    kv, _, dim = cache.shape
    per_block = cache.view(kv, -1, block_size * dim)
    picked = per_block.index_select(1, blocks.flatten())
    return picked.view(kv, blocks.shape[0], blocks.shape[1] * block_size, dim)


class SdpaBackend:
    name = "sdpa"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        step: AttentionMetadata,
        layer: LayerAttention,
    ) -> torch.Tensor:
        self._write_cache(key, value, k_cache, v_cache, step)
        # [H, T, dv]: V's head size, which may differ from K's (and the query's)
        out = self._decode_output(query, value.shape[-1], k_cache, v_cache, step, layer)
        for s, ctx in enumerate(step.context_lens):
            if s in step.decode_seqs:
                continue
            a, b = step.query_starts[s], step.query_starts[s + 1]
            offset = ctx - (b - a)
            if offset == 0:  # fresh prefill: the new K/V are the whole context
                k, v = key[:, a:b], value[:, a:b]
            else:
                slots = step.block_slots[s, :ctx]
                k, v = k_cache.index_select(1, slots), v_cache.index_select(1, slots)
            if not layer.plain:
                out[:, a:b] = _masked_prefill(
                    query[:, a:b], k, v, layer.scaling, offset, layer.softcap, layer.sliding_window
                )
            elif offset == 0:
                out[:, a:b] = _fresh_prefill(query[:, a:b], k, v, layer.scaling)
            else:
                out[:, a:b] = _continued_prefill(query[:, a:b], k, v, layer.scaling, offset)
        return out

    @staticmethod
    def _write_cache(
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        step: AttentionMetadata,
    ) -> None:
        """The step's new K/V into the paged cache, at each token's slot."""
        write_kv_cache(key, value, k_cache, v_cache, step.slot_mapping)

    def _decode_output(
        self,
        query: torch.Tensor,
        v_dim: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        step: AttentionMetadata,
        layer: LayerAttention,
    ) -> torch.Tensor:
        """The ``[H, T, dv]`` output with the batched decode rows attended (the rest for the
        prefill loop to fill)."""
        out = query.new_empty((*query.shape[:2], v_dim))
        if step.decode_seqs:
            out.index_copy_(
                1,
                step.decode_rows,
                self._decode_batch(query, k_cache, v_cache, step, layer),
            )
        return out

    @staticmethod
    def _decode_batch(
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        step: AttentionMetadata,
        layer: LayerAttention,
    ) -> torch.Tensor:
        valid = decode_keys_visible(step, layer.sliding_window)
        bs = step.cache.shape.block_size
        q = query.index_select(1, step.decode_rows)
        blocks = step.decode_blocks  # [D, B]: its shape is host metadata, no device read
        seq_bytes = decode_seq_bytes(
            blocks.shape[1] * bs,
            k_cache.shape[0],
            q.shape[0],
            k_cache.shape[-1],
            v_cache.shape[-1],
            k_cache.element_size(),
        )
        group = decode_group_size(blocks.shape[0], seq_bytes)
        outs = []
        for start in range(0, blocks.shape[0], group):
            rows = slice(start, start + group)
            k = _gather_blocks(k_cache, blocks[rows], bs)  # [KV, group, ctx, d]
            v = _gather_blocks(v_cache, blocks[rows], bs)
            outs.append(_decode(q[:, rows], k, v, valid[rows], layer.scaling, layer.softcap))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


BACKEND = SdpaBackend()
