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
    decode_slots: torch.Tensor | None = None  # [D, max_ctx] padded slots of decode sequences
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, max_ctx] valid-key mask

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
            longest = max(context_lens[i] for i in decode)
            layout.decode_slots = slots[decode, :longest]
            lens = torch.tensor([context_lens[i] for i in decode], device=slots.device)
            mask = torch.arange(longest, device=slots.device) < lens.unsqueeze(1)
            layout.decode_mask = mask[:, None, None, :]
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


def _attend(
    q: torch.Tensor,  # [H, q_len, d]
    k: torch.Tensor,  # [KV, ctx, d]
    v: torch.Tensor,
    scaling: float,
    causal_offset: int | None,  # None: every key visible; else query i sees keys <= offset + i
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    if softcap is None and sliding_window is None:
        if causal_offset is not None and causal_offset > 0:
            q_len, ctx = q.shape[-2], k.shape[-2]
            rows = torch.arange(q_len, device=q.device).unsqueeze(1) + causal_offset
            mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= rows
        is_causal = causal_offset == 0 and mask is None
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            scale=scaling,
            enable_gqa=q.shape[-3] != k.shape[-3],
        )
    # Explicit path for logit soft-capping and sliding windows (Gemma 2, Mistral).
    groups = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(groups, dim=-3)
    v = v.repeat_interleave(groups, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_len, ctx = q.shape[-2], k.shape[-2]
    keys = torch.arange(ctx, device=q.device).unsqueeze(0)
    allowed = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device)
    if causal_offset is not None:
        rows = torch.arange(q_len, device=q.device).unsqueeze(1) + causal_offset
        allowed = keys <= rows
        if sliding_window is not None:
            allowed &= keys > rows - sliding_window
    if mask is not None:
        allowed = allowed & mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


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
    k_cache, v_cache = step.cache.layer(module.layer_idx)
    new_k = key[0].transpose(0, 1)  # [T, KV, d]
    new_v = value[0].transpose(0, 1)
    k_cache.index_copy_(0, step.slot_mapping, new_k.to(k_cache.dtype))
    v_cache.index_copy_(0, step.slot_mapping, new_v.to(v_cache.dtype))

    q_all = query[0]  # [H, T, d]
    out = torch.empty_like(q_all)
    extra = {"softcap": softcap, "sliding_window": sliding_window}
    # decode tokens share one batched call; sliding windows need per-sequence offsets
    batched = (
        set(step.decode_rows) if step.decode_slots is not None and sliding_window is None else set()
    )
    for s, ctx in enumerate(step.context_lens):
        if s in batched:
            continue
        a, b = step.query_starts[s], step.query_starts[s + 1]
        q_len = b - a
        if q_len == ctx:  # fresh prefill: the new K/V are the whole context
            k, v = key[0, :, a:b], value[0, :, a:b]
        else:
            slots = step.context_slots[s]
            k = k_cache[slots].transpose(0, 1)
            v = v_cache[slots].transpose(0, 1)
        out[:, a:b] = _attend(q_all[:, a:b], k, v, scaling, ctx - q_len, **extra)
    if batched:
        rows = [step.query_starts[s] for s in step.decode_rows]
        q = q_all[:, rows].transpose(0, 1).unsqueeze(2)  # [D, H, 1, d]
        k = k_cache[step.decode_slots].transpose(1, 2)  # [D, KV, ctx, d]
        v = v_cache[step.decode_slots].transpose(1, 2)
        o = _attend(q, k, v, scaling, None, mask=step.decode_mask, **extra)  # [D, H, 1, d]
        out[:, rows] = o.squeeze(2).transpose(0, 1)
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
