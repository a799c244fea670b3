"""Head-sharded paged KV cache and its block allocator (with prefix caching).

Every rank holds K and V blocks for its *local* KV heads only: under GQA
replication (TP > KV heads) that is the single KV head its queries use. The
allocator runs on rank 0 alone; other ranks only receive slot numbers.

Prefix caching: a full block is named by the hash of its tokens chained to
the previous block's hash, so equal prefixes map to equal blocks. Blocks are
reference-counted and never written while shared; freed blocks that carry a
hash stay cached and are evicted least-recently-used when space runs out.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Sequence
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


def chain_hash(previous: int | None, tokens: Sequence[int]) -> int:
    return hash((previous, tuple(tokens)))


class BlockAllocator:
    """Free list + reference counts + hash-addressed cached blocks (rank 0 only)."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.free: deque[int] = deque(range(num_blocks))
        self.refcount = [0] * num_blocks
        self.block_hash: dict[int, int] = {}  # block -> hash, for full cached blocks
        self.cached: dict[int, int] = {}  # hash -> block
        self.evictable: OrderedDict[int, None] = (
            OrderedDict()
        )  # cached blocks with refcount 0, LRU first
        self.queries = 0  # prompt blocks looked up
        self.hits = 0  # of those, found cached

    # -- capacity --------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (free + evictable cached)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    # -- allocation ------------------------------------------------------------
    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash.pop(block)]
        else:
            raise RuntimeError("no free KV block (the scheduler should have preempted)")
        self.refcount[block] = 1
        return block

    def share(self, block: int) -> int:
        if self.refcount[block] == 0:
            self.evictable.pop(block, None)
        self.refcount[block] += 1
        return block

    def release(self, block: int) -> None:
        self.refcount[block] -= 1
        if self.refcount[block] > 0:
            return
        if block in self.block_hash:
            self.evictable[block] = None  # keep its contents for future prefix hits
        else:
            self.free.append(block)

    # -- prefix caching ----------------------------------------------------------
    def lookup(self, block_hash: int) -> int | None:
        if not self.enable_prefix_caching:
            return None
        return self.cached.get(block_hash)

    def record_lookups(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit

    def register_full(self, block: int, block_hash: int) -> None:
        """A block just became full: make it findable by its hash (first writer wins)."""
        if not self.enable_prefix_caching or block in self.block_hash or block_hash in self.cached:
            return
        self.block_hash[block] = block_hash
        self.cached[block_hash] = block

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def all_free(self) -> bool:
        """True when no block is referenced (every request finished or aborted)."""
        return all(count == 0 for count in self.refcount)
