"""A fused 3D tensor seen through the per-expert tensors a checkpoint stores.

Mixtral checkpoints hold ``experts.{e}.w1/w3/w2.weight`` per expert, while
transformers 5 fuses them into ``gate_up_proj[e] = cat(w1_e, w3_e)`` and
``down_proj[e] = w2_e``. :class:`StackedSource` presents the fused tensor to a
layer's ``weight_loader`` without building it: slicing it reads only the
requested rows and columns of each component (lazy safetensors handles stay
lazy), so a rank still reads just its shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _shape(handle: Any) -> tuple[int, ...]:
    return tuple(handle.shape) if hasattr(handle, "shape") else tuple(handle.get_shape())


def _bounds(key: slice, size: int) -> tuple[int, int]:
    start, stop, step = key.indices(size)
    if step != 1:
        raise IndexError("StackedSource supports contiguous slices only")
    return start, stop


class StackedSource:
    """``stack([cat(components[e], dim=0) for e in experts])``, read lazily.

    ``components[e]`` are 2D handles (rows, cols) with equal ``cols``; index
    with up to three slices, as ``Partition.take`` does.
    """

    def __init__(self, components: Sequence[Sequence[Any]]) -> None:
        if not components or not components[0]:
            raise ValueError("StackedSource needs at least one expert with one component")
        self.components = [list(row) for row in components]
        self.row_sizes = [_shape(h)[0] for h in self.components[0]]
        cols = {_shape(h)[1] for row in self.components for h in row}
        if len(cols) != 1 or any(
            [_shape(h)[0] for h in row] != self.row_sizes for row in self.components
        ):
            raise ValueError("every expert must store components of the same shapes")
        self.shape = (len(self.components), sum(self.row_sizes), cols.pop())

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, key: Any) -> torch.Tensor:
        keys = key if isinstance(key, tuple) else (key,)
        if len(keys) > 3 or not all(isinstance(k, slice) for k in keys):
            raise IndexError(f"StackedSource takes up to three slices, got {key!r}")
        keys = keys + (slice(None),) * (3 - len(keys))
        e0, e1 = _bounds(keys[0], self.shape[0])
        r0, r1 = _bounds(keys[1], self.shape[1])
        experts = [self._rows(self.components[e], r0, r1, keys[2]) for e in range(e0, e1)]
        return torch.stack(experts)

    def _rows(self, row: list[Any], start: int, stop: int, cols: slice) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``cat(row, dim=0)``, columns ``cols``."""
        pieces, offset = [], 0
        for handle, size in zip(row, self.row_sizes, strict=True):
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                pieces.append(handle[lo - offset : hi - offset, cols])
            offset += size
        return torch.cat(pieces, dim=0)
