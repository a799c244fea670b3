"""Paged attention, plugged into HF models through transformers' AttentionInterface.

The engine builds models with ``attn_implementation="dstp_paged"``; HF's
attention modules then call :func:`paged_attention` with this rank's query
heads and the new (rotated) K/V. One forward carries a packed mix of prefill
chunks and decode tokens (batch 1, no padding); the step's
:class:`AttentionMetadata` arrives through :func:`step_context`, and the
kernel is the device's backend (:mod:`dstp.worker.attention.backends`).
"""

from __future__ import annotations

import torch

from dstp.worker.attention.backends import AttentionBackend, LayerAttention, backend_for
from dstp.worker.attention.metadata import AttentionMetadata, current_step, step_context

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionBackend",
    "AttentionMetadata",
    "LayerAttention",
    "backend_for",
    "paged_attention",
    "register",
    "step_context",
]

ATTN_IMPLEMENTATION = "dstp_paged"


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, dk]
    key: torch.Tensor,  # [1, KV, T, dk]
    value: torch.Tensor,  # [1, KV, T, dv]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    step = current_step()
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    k_cache, v_cache = step.cache.layer(module.layer_idx)  # [KV, slots, dk] and [..., dv]
    layer = LayerAttention(scaling, softcap, sliding_window)
    out = step.backend.forward(query[0], key[0], value[0], k_cache, v_cache, step, layer)
    return out.transpose(0, 1).unsqueeze(0), None  # [1, T, H, dv], as HF expects


def register() -> None:
    """Make ``attn_implementation="dstp_paged"`` known to transformers (idempotent).

    No mask function is registered on purpose: transformers then skips mask
    creation entirely (the paged kernel masks by itself), including its
    packed-sequence detection, which reads a device value once per forward.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
