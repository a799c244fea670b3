"""Activations reuse freed heap memory: no page faults on every forward.

PyTorch's CPU allocator is malloc. glibc serves a block over its mmap threshold
(128 KiB, rising to at most 32 MiB as such blocks are freed) with a fresh
``mmap`` and unmaps it on free, and trims the heap's free top past twice that
threshold. A prefill's activations are such blocks, so every forward faults its
memory in again, 4 KiB at a time, each page zeroed by the kernel: at TP=2 a
1,024-token prefill of a 1B model took 8,000-70,000 faults and up to ~0.1 s of
system time a rank, and any block over 32 MiB (the gate/up output of a
2,048-token step) is mapped afresh on every layer (benchmarks/FINDINGS.md).

Once the model is loaded (the loader has just trimmed its own garbage) dstp
fixes the threshold at glibc's largest, 32 MiB, and stops trimming, as a
caching allocator would keep its blocks: a rank keeps its activation memory
resident between steps instead of faulting it in again. Blocks over 32 MiB
are still mapped afresh: serving those from the heap too (``M_MMAP_MAX`` = 0)
was measured to let glibc's heap grow by whole blocks when small allocations
land in the freed space. The largest activation, the fused layers' gate/up
output, is kept under it instead: a long prefill's MLP runs in row pieces
(:func:`rows_per_block`). ``DSTP_KEEP_HEAP=0`` leaves malloc as it was.
Elsewhere than glibc, nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os

from dstp.cpu import libc

log = logging.getLogger("dstp")

ENV_SWITCH = "DSTP_KEEP_HEAP"  # "0": glibc's own mmap threshold and heap trimming
# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST_HEAP_BLOCK = 32 << 20  # glibc refuses a higher mmap threshold on 64-bit
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the largest it can say
ALIGNMENT_ROOM = 4096  # a block's header and posix_memalign's padding count against the threshold


def keep_freed_memory() -> bool:
    """Tell glibc to serve blocks up to 32 MiB from the heap and keep what is freed; True if
    it agreed."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    mallopt = libc.function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    kept = bool(mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK)) and bool(
        mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    )
    log.debug("freed activation memory %s", "stays in the heap" if kept else "goes back (mallopt)")
    return kept


def rows_per_block(rows: int, row_bytes: int) -> int:
    """Rows per piece when ``rows`` rows of ``row_bytes`` each are split into equal pieces that
    each fit one heap block (at most 32 MiB, with room for malloc's alignment); ``rows`` if
    they fit whole."""
    fit = max(1, (LARGEST_HEAP_BLOCK - ALIGNMENT_ROOM) // row_bytes)
    if rows <= fit:  # no rows at all included
        return rows
    pieces = -(-rows // fit)
    return -(-rows // pieces)
