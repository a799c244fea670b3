"""Attention kernels behind :func:`dstp.worker.attention.paged_attention`, one module per device type.

A backend for a device lives in ``backends/<device type>.py`` (``cuda.py``,
``xpu.py``, ...) and exposes ``BACKEND``; :func:`backend_for` picks it once
when the model runner starts, and falls back to :mod:`.sdpa` (PyTorch's own
kernels, the CPU backend) when no such module exists. Adding a kernel for a
device therefore touches that one new file.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger("dstp")


@dataclass(frozen=True)
class LayerAttention:
    """What one attention layer asks of the kernel beyond its tensors (HF's kwargs)."""

    scaling: float
    softcap: float | None = None
    sliding_window: int | None = None

    @property
    def plain(self) -> bool:
        """Neither soft-capped nor windowed: PyTorch's fused SDPA kernels apply."""
        return self.softcap is None and self.sliding_window is None


class AttentionBackend(Protocol):
    """Writes one layer's new K/V into the paged cache and attends over it."""

    name: str

    def forward(
        self,
        query: torch.Tensor,  # [H, T, dk] this rank's query heads, packed tokens
        key: torch.Tensor,  # [KV, T, dk] new keys (rotated)
        value: torch.Tensor,  # [KV, T, dv]: V's head size may differ from K's (MLA)
        k_cache: torch.Tensor,  # [KV, slots, dk] this layer's cache
        v_cache: torch.Tensor,  # [KV, slots, dv]
        step: object,  # dstp.worker.attention.metadata.AttentionMetadata
        layer: LayerAttention,
    ) -> torch.Tensor:  # [H, T, dv]
        ...


def backend_for(device: torch.device) -> AttentionBackend:
    """The device's own backend module if there is one, else PyTorch SDPA."""
    name = f"{__name__}.{device.type}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        module = importlib.import_module(f"{__name__}.sdpa")
    # a module may choose per device (cuda: its kernel where a start-up check passed)
    backend = module.backend(device) if hasattr(module, "backend") else module.BACKEND
    log.debug("attention backend for %s: %s", device, backend.name)
    return backend
