"""Weights and the KV cache on 2 MiB pages: fewer TLB misses where memory streams.

With 4 KiB pages a 1B model's rank walks ~300,000 pages a token, and under a
hypervisor each TLB miss is a two-level (guest and host) page walk. Linux backs
anonymous memory with transparent huge pages only where a region asks
(``madvise`` mode, the common default), so after loading each large CPU
parameter's pages are advised and collapsed in place (``MADV_COLLAPSE``, Linux
6.1+; ~0.4 s for 1.2 GB). Measured on a KVM Xeon: the GEMV read 2-6 % faster
(benchmarks/FINDINGS.md). The KV cache is advised before its zeros first touch
it (:func:`zeros`), so it faults in on huge pages with nothing copied (where free
memory is fragmented the kernel compacts it first: seconds a GiB at start-up on a
VM). Where the kernel or libc refuses, nothing changes. ``DSTP_HUGE_PAGES=0``
turns both off."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import time
from collections.abc import Iterable

import torch

from dstp.cpu import libc

log = logging.getLogger("dstp")

ENV_SWITCH = "DSTP_HUGE_PAGES"  # "0": the weights and the KV cache stay on the pages malloc gave
HUGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25


@functools.cache
def _madvise():
    """libc's ``madvise`` with its argument types, or None (not Linux/glibc)."""
    madvise = libc.function("madvise")
    if madvise is not None:
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def _advice():
    """``madvise`` where huge pages are wanted here, else None (no libc's, or switched off)."""
    return None if os.environ.get(ENV_SWITCH, "1") == "0" else _madvise()


def huge_page_span(tensor: torch.Tensor) -> tuple[int, int] | None:
    """The whole 2 MiB pages inside ``tensor``'s storage as (start address, length), if any."""
    storage = tensor.untyped_storage()
    first = (storage.data_ptr() + HUGE - 1) // HUGE * HUGE
    last = (storage.data_ptr() + storage.nbytes()) // HUGE * HUGE
    return (first, last - first) if last > first else None


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros whose whole 2 MiB pages are advised onto huge pages before the
    zeros first touch them, so they fault in as huge pages: no collapse, no copy.

    For buffers read in scattered pieces, as the paged KV cache is once its block tables have
    churned: with 4 KiB pages a 2 KiB block of one head's keys is a TLB miss of its own
    (FINDINGS.md, "Decode attention in the engine").
    """
    tensor = torch.empty(shape, dtype=dtype)
    span, madvise = huge_page_span(tensor), _advice()
    if span is not None and madvise is not None and madvise(span[0], span[1], MADV_HUGEPAGE):
        log.debug("a buffer stays on 4 KiB pages: madvise said %s", os.strerror(ctypes.get_errno()))
    return tensor.zero_()


def collapse(tensors: Iterable[torch.Tensor]) -> int:
    """Backs each CPU tensor's whole 2 MiB pages with huge pages; returns the bytes collapsed."""
    madvise = _advice()
    if madvise is None:
        return 0
    started, done, refused, seen = time.perf_counter(), 0, None, set()
    for tensor in tensors:
        span = None if tensor.device.type != "cpu" else huge_page_span(tensor)
        if span is None or span in seen:
            continue
        seen.add(span)
        if madvise(span[0], span[1], MADV_HUGEPAGE) or madvise(span[0], span[1], MADV_COLLAPSE):
            refused = os.strerror(ctypes.get_errno())
            continue
        done += span[1]
    if refused:
        log.debug("some weights stay on 4 KiB pages: madvise said %s", refused)
    log.debug(
        "%.2f GB of weights on 2 MiB pages in %.2f s", done / 1e9, time.perf_counter() - started
    )
    return done
