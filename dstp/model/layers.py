"""Tensor-parallel layers (Megatron's column/row pair, vocab-parallel embedding and head).

Each layer allocates only this rank's shard and owns a ``weight_loader`` that
reads a full checkpoint tensor, or a lazy safetensors slice of one, into that
shard (vLLM's per-parameter loader pattern). Loaders index the source with
``source[a:b]`` / ``source[:, a:b]`` only, so a safetensors ``get_slice``
handle reads just this rank's bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dstp.cpu.kernels import linear_2d
from dstp.distributed import TPGroup
from dstp.policies.base import HeadLayout, parse_part


@dataclass(frozen=True)
class Partition:
    """The ranges of a full dimension that one rank holds, in order."""

    full_size: int
    ranges: tuple[tuple[int, int], ...]  # (start, length) in the full dimension

    @property
    def local_size(self) -> int:
        return sum(length for _, length in self.ranges)

    def take(self, source: Any, dim: int) -> torch.Tensor:
        """Read this rank's ranges of ``source`` along ``dim`` (slices only, so lazy handles work)."""
        lead = (slice(None),) * dim
        pieces = [source[(*lead, slice(a, a + n))] for a, n in self.ranges]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)

    def read_into(self, dest: torch.Tensor, source: Any, dim: int) -> None:
        """``dest.copy_(self.take(source, dim))``, straight from the file for lazy handles."""
        lead = (slice(None),) * dim
        at = 0
        for a, n in self.ranges:
            copy_slice(dest.narrow(dim, at, n), source, (*lead, slice(a, a + n)))
            at += n


def copy_slice(dest: torch.Tensor, source: Any, key: Any) -> None:
    """``dest.copy_(source[key])``; a checkpoint handle fills ``dest`` without a temporary."""
    if hasattr(source, "read_into"):
        source.read_into(dest, key)
    else:
        dest.copy_(source[key])


def split_units(offset: int, units: int, unit_size: int, rank: int, size: int) -> tuple[int, int]:
    """This rank's (start, length) of ``units`` equal units starting at ``offset``.

    With ``units >= size`` each rank takes ``units / size`` consecutive units;
    with ``units < size`` (KV heads under GQA replication) each unit is shared
    by ``size / units`` consecutive ranks: rank r takes unit ``r * units // size``.
    """
    local_units = max(1, units // size)
    first = rank * units // size
    return offset + first * unit_size, local_units * unit_size


def partition_for(
    parts: Sequence[str], full_size: int, heads: HeadLayout, rank: int, size: int
) -> Partition:
    """Resolve a policy's ``parts`` (see dstp.policies.base) against a real dimension.

    Raises ValueError when the parts do not add up to ``full_size``: the
    policy does not describe this module.
    """
    parsed = [parse_part(part) for part in parts]
    head_units = {"q": heads.num_heads, "kv": heads.num_kv_heads}
    fixed = sum(
        head_units[p.kind] * p.unit_size(heads.head_dim) for p in parsed if p.kind != "even"
    )
    even_parts = sum(p.kind == "even" for p in parsed)
    even_units = 0
    if even_parts:
        rest = full_size - fixed
        if rest <= 0 or rest % even_parts:
            raise ValueError(f"parts {tuple(parts)} do not fit a dimension of {full_size}")
        even_units = rest // even_parts
    # (units, unit size) of each part, in order
    resolved = [(head_units.get(p.kind, even_units), p.unit_size(heads.head_dim)) for p in parsed]
    total = sum(units * unit for units, unit in resolved)
    if total != full_size:
        raise ValueError(
            f"parts {tuple(parts)} add up to {total}, but the dimension is {full_size}"
        )
    ranges, offset = [], 0
    for part, (units, unit) in zip(parsed, resolved, strict=True):
        if part.kind == "even" and units % size:
            raise ValueError(f"a dimension of {units} does not split evenly over TP={size}")
        ranges.append(split_units(offset, units, unit, rank, size))
        offset += units * unit
    return Partition(full_size, tuple(ranges))


def empty_param(shape: tuple[int, ...], dtype: torch.dtype | None, device: Any) -> nn.Parameter:
    """An uninitialised frozen parameter: a shard is allocated before its loader fills it."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def load_replicated(param: torch.Tensor, source: Any) -> None:
    """Default loader: the full tensor, unchanged (norms, biases of row layers...)."""
    shape = tuple(source.shape)
    if shape != tuple(param.shape):
        raise ValueError(f"checkpoint shape {shape} != parameter {tuple(param.shape)}")
    copy_slice(param.data, source, slice(None) if shape else ())


class _ShardedLinear(nn.Module):
    """What both halves of the Megatron pair share: a local weight cut by ``partition``.

    ``split_dim`` is the dimension of the ``(out, in)`` weight the partition
    cuts; a transposed checkpoint (``(in, out)``, GPT-2's Conv1D) is cut
    along the other one and transposed on load.
    """

    split_dim = 0

    def __init__(
        self,
        partition: Partition,
        in_features: int,
        out_features: int,
        bias: bool,
        tp: TPGroup,
        transposed: bool,
        dtype: torch.dtype | None,
        device: Any,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.partition = partition
        self.in_features = in_features
        self.out_features = out_features
        self.transposed = transposed  # checkpoint stores (in, out)
        self.weight = empty_param((out_features, in_features), dtype, device)
        self.weight.weight_loader = self.load_weight
        self.bias = empty_param((out_features,), dtype, device) if bias else None

    def load_weight(self, param: torch.Tensor, source: Any) -> None:
        if self.transposed:
            param.data.copy_(self.partition.take(source, dim=1 - self.split_dim).t())
        else:
            self.partition.read_into(param.data, source, dim=self.split_dim)


class ColumnParallelLinear(_ShardedLinear):
    """``y = x W^T + b`` with W's output rows split: each rank computes its features."""

    split_dim = 0

    def __init__(
        self,
        in_features: int,
        partition: Partition,
        bias: bool,
        tp: TPGroup,
        *,
        transposed: bool = False,
        gather_output: bool = False,
        dtype: torch.dtype | None = None,
        device: Any = "meta",
    ) -> None:
        out_features = partition.local_size
        super().__init__(partition, in_features, out_features, bias, tp, transposed, dtype, device)
        self.gather_output = gather_output
        if self.bias is not None:
            self.bias.weight_loader = self.load_bias

    def load_bias(self, param: torch.Tensor, source: Any) -> None:
        self.partition.read_into(param.data, source, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear_2d(x, self.weight, self.bias)
        return self.tp.all_gather(y, dim=-1) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}/{self.partition.full_size}, tp={self.tp.size}"


class RowParallelLinear(_ShardedLinear):
    """``y = x W^T + b`` with W's input columns split; one all-reduce sums the parts.

    The input arrives already split (it is a column-parallel layer's output),
    and the bias is added once, after the reduction.
    """

    split_dim = 1

    def __init__(
        self,
        partition: Partition,
        out_features: int,
        bias: bool,
        tp: TPGroup,
        *,
        transposed: bool = False,
        dtype: torch.dtype | None = None,
        device: Any = "meta",
    ) -> None:
        in_features = partition.local_size
        super().__init__(partition, in_features, out_features, bias, tp, transposed, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``y``: its input columns' product, before the all-reduce."""
        return linear_2d(x, self.weight)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """``y`` from this rank's :meth:`partial`: the all-reduce, then the bias."""
        y = self.tp.all_reduce(partial)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}/{self.partition.full_size}, out={self.out_features}, tp={self.tp.size}"


def vocab_partition(vocab_size: int, tp: TPGroup) -> tuple[int, int]:
    """(first row, rows per rank) of a vocabulary padded to a multiple of the TP size."""
    per_rank = -(-vocab_size // tp.size)
    return tp.rank * per_rank, per_rank


class _VocabShard(nn.Module):
    """Rows ``[start, start + per_rank)`` of a vocabulary-sized matrix, zero-padded past the end."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup, dtype: Any, device: Any) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.start, self.per_rank = vocab_partition(vocab_size, tp)
        self.weight = empty_param((self.per_rank, hidden), dtype, device)
        self.weight.weight_loader = self.load_weight

    def load_weight(self, param: torch.Tensor, source: Any) -> None:
        real = max(0, min(self.per_rank, self.vocab_size - self.start))
        param.data.zero_()
        if real:
            copy_slice(param.data[:real], source, slice(self.start, self.start + real))


class VocabParallelEmbedding(_VocabShard):
    """Embedding with the vocabulary split: ids outside this rank's rows look up zeros.

    ``scale`` reproduces embeddings that multiply their output by a constant
    (Gemma): applied after the all-reduce, rounded as HF rounds it (an fp32
    scalar cast to the weight dtype).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        tp: TPGroup,
        dtype: Any = None,
        device: Any = "meta",
        scale: float | None = None,
    ) -> None:
        super().__init__(vocab_size, hidden, tp, dtype, device)
        self.num_embeddings = vocab_size
        self.embedding_dim = hidden
        self.scale = None if scale is None else nn.Buffer(torch.tensor(scale), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            out = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.start) | (ids >= self.start + self.per_rank)
            local = (ids - self.start).masked_fill(outside, 0)
            out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
            out = self.tp.all_reduce(out)
        return out if self.scale is None else out * self.scale.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"rows={self.start}..{self.start + self.per_rank} of {self.vocab_size}, tp={self.tp.size}"


class ParallelLMHead(_VocabShard):
    """LM head with the vocabulary split; logits gathered and padding trimmed.

    ``forward`` gives full-vocabulary logits on every rank (HF ``generate``
    needs them); the engine calls :meth:`logits_on_driver` to gather only
    the rows it samples, only on rank 0.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        bias: bool,
        tp: TPGroup,
        dtype: Any = None,
        device: Any = "meta",
    ) -> None:
        super().__init__(vocab_size, hidden, tp, dtype, device)
        self.in_features = hidden
        self.out_features = vocab_size
        self.bias = empty_param((self.per_rank,), dtype, device) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.load_weight

    def _local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear_2d(hidden, self.weight, self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather(self._local_logits(hidden), dim=-1)[..., : self.vocab_size]

    def logits_on_driver(self, hidden: torch.Tensor) -> torch.Tensor | None:
        full = self.tp.gather_to_driver(self._local_logits(hidden), dim=-1)
        return None if full is None else full[..., : self.vocab_size]
