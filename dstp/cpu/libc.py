"""The C library's functions dstp calls through ctypes (heap trimming, page advice)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def function(name: str) -> Any | None:
    """libc's ``name`` with errno kept for ``ctypes.get_errno``, or None where this libc
    has no such function (not glibc, no libc found). Looked up once per process:
    ``find_library`` runs ``ldconfig``, and loading trims the heap after every layer."""
    path = ctypes.util.find_library("c")
    if not path:
        return None
    try:
        return getattr(ctypes.CDLL(path, use_errno=True), name)
    except (OSError, AttributeError):
        return None
