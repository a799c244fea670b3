"""Paged attention, plugged into HF models through transformers' AttentionInterface.

The engine builds models with ``attn_implementation="dstp_paged"``; HF's
attention modules then call :func:`paged_attention` with this rank's query
heads and the new (rotated) K/V. It writes K/V into the sequence's cache
slots and attends over the sequence's blocks. One forward carries a packed
mix of prefill chunks and decode tokens (batch 1, no padding); the per-step
layout arrives through :func:`step_context`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import PagedKVCache

ATTN_IMPLEMENTATION = "dstp_paged"


@dataclass
class StepLayout:
    """Where each packed token goes and what each sequence attends to (same on all ranks)."""

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    query_starts: list[int]  # [S + 1] offsets of each sequence's tokens in the packed batch
    context_lens: list[int]  # [S] tokens in cache after this step (prefix + new)
    context_slots: list[torch.Tensor]  # [S] cache slots of each sequence's whole context
    decode_rows: list[int]  # sequences with exactly one new token, batched together
    decode_blocks: torch.Tensor | None = None  # [D, B] block tables of decode sequences
    decode_mask: torch.Tensor | None = None  # [D, B * block_size] valid-key mask

    @classmethod
    def build(
        cls,
        cache: PagedKVCache,
        slot_mapping: torch.Tensor,
        query_starts: list[int],
        context_lens: list[int],
        block_tables: torch.Tensor,
    ) -> StepLayout:
        bs = cache.shape.block_size
        offsets = torch.arange(bs, device=block_tables.device)
        slots = (block_tables.long().unsqueeze(-1) * bs + offsets).flatten(
            1
        )  # [S, max_blocks * bs]
        context_slots = [slots[i, :n] for i, n in enumerate(context_lens)]
        decode = [i for i in range(len(context_lens)) if query_starts[i + 1] - query_starts[i] == 1]
        layout = cls(cache, slot_mapping, query_starts, context_lens, context_slots, decode)
        if len(decode) > 1:
            blocks = -(-max(context_lens[i] for i in decode) // bs)
            layout.decode_blocks = block_tables[decode, :blocks].long()
            lens = torch.tensor([context_lens[i] for i in decode], device=slots.device)
            layout.decode_mask = torch.arange(blocks * bs, device=slots.device) < lens.unsqueeze(1)
        return layout


_STEP: StepLayout | None = None


@contextlib.contextmanager
def step_context(layout: StepLayout) -> Iterator[None]:
    global _STEP
    _STEP = layout
    try:
        yield
    finally:
        _STEP = None


def _prefill(
    q: torch.Tensor,  # [H, q_len, d]
    k: torch.Tensor,  # [KV, ctx, d]
    v: torch.Tensor,
    scaling: float,
    offset: int,  # query i sees keys <= offset + i
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of one sequence's new tokens over its whole context."""
    q_len, ctx = q.shape[-2], k.shape[-2]
    rows = torch.arange(q_len, device=q.device).unsqueeze(1) + offset
    keys = torch.arange(ctx, device=q.device).unsqueeze(0)
    if softcap is None and sliding_window is None:
        # 4-D inputs reach the fused (flash) CPU kernel; 3-D ones do not (5-10x slower).
        mask = None if offset == 0 or q_len == 1 else keys <= rows  # one token sees everything
        out = F.scaled_dot_product_attention(
            q[None],
            k[None],
            v[None],
            attn_mask=mask,
            is_causal=offset == 0,
            scale=scaling,
            enable_gqa=q.shape[0] != k.shape[0],
        )
        return out[0]
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
    q: torch.Tensor,  # [H, D, d]: one new token per sequence
    k: torch.Tensor,  # [KV, D, ctx, d]
    v: torch.Tensor,
    valid: torch.Tensor,  # [D, ctx] keys each sequence may see
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Batched single-token attention, grouping query heads per KV head; returns [H, D, d].

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
    scores = scores.masked_fill(~valid[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [KV, D, G, d]
    return out.transpose(1, 2).reshape(heads, d_seqs, dim)


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[KV, slots, d]`` cache -> ``[KV, D, B * block_size, d]`` for ``[D, B]`` block tables."""
    kv, _, dim = cache.shape
    per_block = cache.view(kv, -1, block_size * dim)
    picked = per_block.index_select(1, blocks.flatten())
    return picked.view(kv, blocks.shape[0], blocks.shape[1] * block_size, dim)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, d]
    key: torch.Tensor,  # [1, KV, T, d]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    step = _STEP
    if step is None:
        raise RuntimeError("dstp paged attention called outside an engine step")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    k_cache, v_cache = step.cache.layer(module.layer_idx)  # [KV, slots, d]
    k_cache.index_copy_(1, step.slot_mapping, key[0].to(k_cache.dtype))
    v_cache.index_copy_(1, step.slot_mapping, value[0].to(v_cache.dtype))

    q_all = query[0]  # [H, T, d]
    out = torch.empty_like(q_all)
    batched = set(step.decode_rows) if step.decode_blocks is not None else set()
    for s, ctx in enumerate(step.context_lens):
        if s in batched:
            continue
        a, b = step.query_starts[s], step.query_starts[s + 1]
        q_len = b - a
        if q_len == ctx:  # fresh prefill: the new K/V are the whole context
            k, v = key[0, :, a:b], value[0, :, a:b]
        else:
            slots = step.context_slots[s]
            k = k_cache.index_select(1, slots)  # [KV, ctx, d]
            v = v_cache.index_select(1, slots)
        out[:, a:b] = _prefill(q_all[:, a:b], k, v, scaling, ctx - q_len, softcap, sliding_window)
    if batched:
        rows = [step.query_starts[s] for s in step.decode_rows]
        valid = step.decode_mask
        if sliding_window is not None:
            lens = valid.sum(-1, keepdim=True)
            valid = valid & (
                torch.arange(valid.shape[-1], device=valid.device) >= lens - sliding_window
            )
        bs = step.cache.shape.block_size
        k = _gather_blocks(k_cache, step.decode_blocks, bs)  # [KV, D, ctx, d]
        v = _gather_blocks(v_cache, step.decode_blocks, bs)
        out[:, rows] = _decode(q_all[:, rows], k, v, valid, scaling, softcap)
    return out.transpose(0, 1).unsqueeze(0), None  # [1, T, H, d], as HF expects


def _no_mask(*args: object, **kwargs: object) -> None:
    """The paged kernel masks by itself; HF need not build a [T, T] mask."""
    return None


def register() -> None:
    """Make ``attn_implementation="dstp_paged"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
