"""The KV block allocator (rank 0 only), with prefix caching.

A full block is named by the hash of its tokens chained to the previous block's hash,
so equal prefixes map to equal blocks. Blocks are reference-counted and never written
while shared; freed blocks that carry a hash stay cached and are evicted
least-recently-used when space runs out.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Sequence

log = logging.getLogger("dstp")


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
        if self.refcount[block] <= 0:
            raise RuntimeError(f"KV block {block} released but nobody holds it (a double free)")
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
