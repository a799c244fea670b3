"""The KV block allocator alone: free list, reference counts, prefix cache and its LRU."""

from __future__ import annotations

import pytest

from dstp.engine.block_allocator import BlockAllocator, chain_hash


def test_allocate_until_empty_then_release():
    a = BlockAllocator(3)
    blocks = [a.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and a.num_free == 0 and a.num_used == 3
    with pytest.raises(RuntimeError, match="no free KV block"):
        a.allocate()
    a.release(blocks[1])
    assert a.num_free == 1 and a.allocate() == blocks[1]
    for block in blocks:
        a.release(block)
    assert a.all_free() and a.num_free == 3


def test_a_shared_block_is_freed_by_its_last_holder():
    a = BlockAllocator(2)
    block = a.allocate()
    assert a.share(block) == block and a.refcount[block] == 2
    a.release(block)
    assert a.refcount[block] == 1 and a.num_free == 1
    a.release(block)
    assert a.refcount[block] == 0 and a.num_free == 2 and a.all_free()


def test_releasing_a_block_nobody_holds_raises():
    a = BlockAllocator(2)
    block = a.allocate()
    a.release(block)
    with pytest.raises(RuntimeError, match=f"KV block {block} released but nobody holds it"):
        a.release(block)
    assert a.refcount[block] == 0 and a.num_free == 2 and list(a.free).count(block) == 1


def test_a_full_block_stays_cached_after_release_and_is_found_again():
    a = BlockAllocator(4)
    h = chain_hash(None, [1, 2, 3, 4])
    block = a.allocate()
    a.register_full(block, h)
    a.release(block)
    assert a.num_free == 4  # evictable counts as free
    assert a.lookup(h) == block
    a.share(block)  # a prefix hit revives it
    assert a.refcount[block] == 1 and a.num_free == 3
    assert block not in a.evictable


def test_eviction_takes_the_least_recently_released_first():
    a = BlockAllocator(3)
    hashes = [chain_hash(None, [i]) for i in range(3)]
    blocks = [a.allocate() for _ in range(3)]
    for block, h in zip(blocks, hashes, strict=True):
        a.register_full(block, h)
    for i in (1, 0, 2):  # released in this order: 1 is the oldest
        a.release(blocks[i])
    assert a.allocate() == blocks[1]
    assert a.lookup(hashes[1]) is None  # evicted: its hash is gone
    assert a.lookup(hashes[0]) == blocks[0] and a.lookup(hashes[2]) == blocks[2]
    a.share(blocks[0])  # used again: no longer evictable
    assert a.allocate() == blocks[2]
    with pytest.raises(RuntimeError):
        a.allocate()


def test_free_blocks_go_before_cached_ones():
    a = BlockAllocator(2)
    cached = a.allocate()
    a.register_full(cached, chain_hash(None, [9]))
    a.release(cached)
    assert a.allocate() != cached  # the plain free block first
    assert a.lookup(chain_hash(None, [9])) == cached


def test_the_first_writer_of_a_hash_wins():
    a = BlockAllocator(2)
    h = chain_hash(None, [5, 6])
    first, second = a.allocate(), a.allocate()
    a.register_full(first, h)
    a.register_full(second, h)
    assert a.lookup(h) == first and second not in a.block_hash
    a.release(second)
    assert second in a.free  # not cached: back to the free list


def test_without_prefix_caching_nothing_is_cached():
    a = BlockAllocator(2, enable_prefix_caching=False)
    h = chain_hash(None, [1])
    block = a.allocate()
    a.register_full(block, h)
    a.release(block)
    assert a.lookup(h) is None and not a.evictable and a.num_free == 2


def test_hit_rate_counts_lookups():
    a = BlockAllocator(1)
    assert a.hit_rate == 0.0
    a.record_lookups(4, 1)
    a.record_lookups(4, 3)
    assert a.hit_rate == 0.5


def test_chain_hash_depends_on_the_prefix():
    first = chain_hash(None, [1, 2])
    assert chain_hash(first, [3, 4]) != chain_hash(chain_hash(None, [9, 9]), [3, 4])
    assert chain_hash(first, [3, 4]) == chain_hash(chain_hash(None, [1, 2]), [3, 4])
