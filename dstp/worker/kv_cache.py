"""Head-sharded paged KV cache: every rank's K and V blocks for its *local* KV heads.

Under GQA replication (TP > KV heads) a rank holds the single KV head its queries use.
K and V may have different head sizes (DeepSeek's MLA: K 192 = 128 + 64 rope, V 128), so
they live in two tensors, each with its own head size.
Which block a token goes to is decided on rank 0 (``dstp.engine.block_allocator``);
the other ranks only receive slot numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dstp.cpu import huge_pages

log = logging.getLogger("dstp")


@dataclass(frozen=True)
class CacheShape:
    """Sizes of one rank's cache; identical arithmetic on every rank."""

    num_layers: int
    local_kv_heads: int
    k_head_dim: int
    v_head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """K and V, all layers, this rank's heads."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        per_head = self.k_head_dim + self.v_head_dim
        return self.num_layers * self.local_kv_heads * per_head * itemsize

    def blocks_for(self, memory_bytes: int) -> int:
        return memory_bytes // (self.bytes_per_token * self.block_size)


def v_head_dim(policy: object, config: object, k_head_dim: int) -> int:
    """V's head size: the config attribute a policy names in ``v_head_dim_attr`` (MLA's
    ``v_head_dim``, see ``policies/deepseek.py``), else K's."""
    attr = getattr(policy, "v_head_dim_attr", None)
    if attr is None:
        return k_head_dim
    value = getattr(config, attr, None)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"policy names v_head_dim_attr={attr!r}, but the config has {value!r}")
    return value


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cache tensor; on CPU on 2 MiB pages (huge_pages.zeros)."""
    if device.type == "cpu":
        return huge_pages.zeros(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


class PagedKVCache:
    """``num_blocks`` blocks of ``block_size`` token slots per layer, for K and V.

    ``scratch_block``: one more block, past the ``num_blocks`` the allocator hands out, that
    the padding rows of a bucketed decode step write to and read from
    (:mod:`dstp.worker.decode_buckets`); no sequence's block is ever written for them.
    """

    def __init__(
        self,
        shape: CacheShape,
        num_blocks: int,
        device: torch.device,
        scratch_block: bool = False,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(
                f"KV cache budget holds no block ({shape.bytes_per_token * shape.block_size} bytes "
                "per block per rank): raise --kv-cache-memory"
            )
        self.shape = shape
        self.num_blocks = num_blocks
        self.scratch_block: int | None = num_blocks if scratch_block else None
        slots = (num_blocks + int(scratch_block)) * shape.block_size
        # [layer, local kv head, slot, head dim] for K and for V, each with its own head
        # dim; a slot is block * block_size + offset. Head-major, so a head's block is one
        # contiguous run of block_size * head dim values: decode gathers whole blocks
        # straight into [head, seq, ctx, dim]. On CPU on 2 MiB pages: once block tables scatter,
        # each block is a page walk of its own on 4 KiB pages.
        self.keys, self.values = (
            _zeros((shape.num_layers, shape.local_kv_heads, slots, dim), shape.dtype, device)
            for dim in (shape.k_head_dim, shape.v_head_dim)
        )

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K ``[local kv heads, slots, k_head_dim]`` and V ``[..., v_head_dim]`` of one layer."""
        return self.keys[index], self.values[index]

    def copy_blocks(self, pairs: torch.Tensor) -> None:
        """Copy whole blocks ``src -> dst`` (rows of ``pairs``) in every layer (copy-on-write forks)."""
        bs = self.shape.block_size
        for src, dst in pairs.tolist():
            for data in (self.keys, self.values):
                data[:, :, dst * bs : (dst + 1) * bs] = data[:, :, src * bs : (src + 1) * bs]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))
