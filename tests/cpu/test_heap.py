"""dstp.cpu.heap: after loading, freed activation memory is reused, not faulted in again.

Each case runs in a fresh interpreter (mallopt changes the whole process) and repeats, through
malloc itself, what a layer's forward does to the heap: three 16 MiB activations at once, each
written, all freed at the end. Left to itself glibc trims the freed top of its heap (more than
twice its threshold) and faults the pages in again the next round; told to keep it, the rounds
after the first reuse them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dstp.cpu import libc

SCRIPT = """
import ctypes, resource
from dstp.cpu import heap, libc
kept = heap.keep_freed_memory()
malloc, free = libc.function("malloc"), libc.function("free")
malloc.restype, malloc.argtypes, free.argtypes = ctypes.c_void_p, (ctypes.c_size_t,), (ctypes.c_void_p,)
def faults_of_a_round(size=16 << 20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [malloc(size) for _ in range(3)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in reversed(blocks):
        free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
rounds = [faults_of_a_round() for _ in range(6)]
print(kept, min(rounds[2:]), rounds)
"""

needs_glibc = pytest.mark.skipif(
    libc.function("mallopt") is None, reason="mallopt is glibc's; elsewhere nothing changes"
)


def _later_rounds(switch: str) -> tuple[bool, int]:
    """Whether glibc agreed, and the fewest faults of rounds 3-6."""
    env = {**os.environ, "DSTP_KEEP_HEAP": switch}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    kept, faults = out.stdout.split()[:2]
    return kept == "True", int(faults)


@needs_glibc
def test_freed_activations_are_reused_without_faults():
    kept, faults = _later_rounds("1")
    assert kept
    assert faults < 1000, faults  # 3 x 4,096 pages of 4 KiB were they faulted in again


@needs_glibc
def test_the_switch_leaves_malloc_alone_and_every_round_faults_again():
    """The counter can fail: without the change the same rounds fault their pages in again."""
    kept, faults = _later_rounds("0")
    assert not kept
    assert faults > 2000, faults


def test_rows_per_block_splits_evenly_under_the_block():
    from dstp.cpu.heap import ALIGNMENT_ROOM, LARGEST_HEAP_BLOCK, rows_per_block

    row = 16 << 10  # the 1B shape's gate/up row at TP=2, bf16
    fit = (LARGEST_HEAP_BLOCK - ALIGNMENT_ROOM) // row
    assert rows_per_block(0, row) == 0 and rows_per_block(fit, row) == fit
    assert rows_per_block(2048, row) == 1024  # two equal pieces, not 2,047 and 1
    assert rows_per_block(3 * fit + 1, row) * row <= LARGEST_HEAP_BLOCK - ALIGNMENT_ROOM
