"""The step's new K/V into the paged cache, in place under ``torch.compile`` too.

Written as ``index_copy_`` on one layer's view of the cache, a compiled decode step
is functionalized into a new copy of that layer's whole cache, written back every step
(inductor, torch 2.11-2.13): on an H200 the first layer's 3.8 GiB copy ran the device
out of memory; on a CPU a 1.2 GB cache took a step from 3 ms to 2.5 s (FINDINGS, "The
second GPU run"). As a custom op that declares the caches it mutates, the write stays
one in-place scatter. Eager steps call ``index_copy_`` directly (no custom-op dispatch
on the host path).
"""

from __future__ import annotations

import torch


def _index_copy(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    k_cache.index_copy_(1, slots, key.to(k_cache.dtype))
    v_cache.index_copy_(1, slots, value.to(v_cache.dtype))


_write_op = torch.library.custom_op(
    "dstp::write_kv_cache", _index_copy, mutates_args=("k_cache", "v_cache")
)


@_write_op.register_fake
def _(key, value, k_cache, v_cache, slots):
    return None


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """``key``/``value [KV, T, d]`` into ``k_cache``/``v_cache [KV, slots, d]`` at each
    token's slot."""
    write = _write_op if torch.compiler.is_compiling() else _index_copy
    write(key, value, k_cache, v_cache, slots)
