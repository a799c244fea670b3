"""Head-sharded paged KV cache: every rank's K and V blocks for its *local* KV heads.

Under GQA replication (TP > KV heads) a rank holds the single KV head its queries use.
Which block a token goes to is decided on rank 0 (``dstp.engine.block_allocator``);
the other ranks only receive slot numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("dstp")


@dataclass(frozen=True)
class CacheShape:
    """Sizes of one rank's cache; identical arithmetic on every rank."""

    num_layers: int
    local_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """K and V, all layers, this rank's heads."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.local_kv_heads * self.head_dim * itemsize

    def blocks_for(self, memory_bytes: int) -> int:
        return memory_bytes // (self.bytes_per_token * self.block_size)


class PagedKVCache:
    """``num_blocks`` blocks of ``block_size`` token slots per layer, for K and V."""

    def __init__(self, shape: CacheShape, num_blocks: int, device: torch.device) -> None:
        if num_blocks < 1:
            raise ValueError(
                f"KV cache budget holds no block ({shape.bytes_per_token * shape.block_size} bytes "
                "per block per rank): raise --kv-cache-memory"
            )
        self.shape = shape
        self.num_blocks = num_blocks
        slots = num_blocks * shape.block_size
        # [layer, K/V, local kv head, slot, head_dim]; a slot is block * block_size + offset.
        # Head-major, so a head's block is one contiguous run of block_size * head_dim
        # values: decode gathers whole blocks straight into [head, seq, ctx, dim].
        self.data = torch.zeros(
            (shape.num_layers, 2, shape.local_kv_heads, slots, shape.head_dim),
            dtype=shape.dtype,
            device=device,
        )

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each ``[local kv heads, slots, head_dim]``."""
        return self.data[index, 0], self.data[index, 1]

    def copy_blocks(self, pairs: torch.Tensor) -> None:
        """Copy whole blocks ``src -> dst`` (rows of ``pairs``) in every layer (copy-on-write forks)."""
        bs = self.shape.block_size
        for src, dst in pairs.tolist():
            self.data[:, :, :, dst * bs : (dst + 1) * bs] = self.data[
                :, :, :, src * bs : (src + 1) * bs
            ]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
