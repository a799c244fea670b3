"""Tensor-parallel layers (Megatron's column/row pair, vocab-parallel embedding and head).

Each layer allocates only this rank's shard and owns a ``weight_loader`` that
reads a full checkpoint tensor, or a lazy safetensors slice of one, into that
shard (vLLM's per-parameter loader pattern). Loaders index the source with
``source[a:b]`` / ``source[:, a:b]`` only, so a safetensors ``get_slice``
handle reads just this rank's bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .distributed import TPGroup


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
    parts: Sequence[str], full_size: int, heads: Any, rank: int, size: int
) -> Partition:
    """Resolve a policy's ``parts`` (see dstp.policies.base) against a real dimension.

    ``heads`` is the policy's HeadLayout. Raises ValueError when the parts do
    not add up to ``full_size``: the policy does not describe this module.
    """
    fixed = 0
    even_parts = 0
    resolved: list[tuple[str, int, int]] = []  # kind, units, unit_size
    for part in parts:
        kind, _, mult = part.partition(":")
        block = heads.head_dim * (int(mult) if mult else 1)
        if kind == "q":
            resolved.append((kind, heads.num_heads, block))
            fixed += heads.num_heads * block
        elif kind == "kv":
            resolved.append((kind, heads.num_kv_heads, block))
            fixed += heads.num_kv_heads * block
        else:
            resolved.append((kind, 0, 1))
            even_parts += 1
    if even_parts:
        rest = full_size - fixed
        if rest <= 0 or rest % even_parts:
            raise ValueError(f"parts {tuple(parts)} do not fit a dimension of {full_size}")
        resolved = [(k, u if k != "even" else rest // even_parts, s) for k, u, s in resolved]
    total = sum(units * unit for _, units, unit in resolved)
    if total != full_size:
        raise ValueError(
            f"parts {tuple(parts)} add up to {total}, but the dimension is {full_size}"
        )
    ranges, offset = [], 0
    for kind, units, unit in resolved:
        if kind == "even" and units % size:
            raise ValueError(f"a dimension of {units} does not split evenly over TP={size}")
        ranges.append(split_units(offset, units, unit, rank, size))
        offset += units * unit
    return Partition(full_size, tuple(ranges))


def linear_2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` on a flattened input, with the faster CPU kernel for one row.

    - For a strided 3-D view (HF's ``hidden[:, -1:, :]``) and a weight that
      does not require grad, ``matmul`` takes its bmm path, which copies the
      transposed weight once per batch row: 263 MB per sequence for a 1B
      model's LM-head shard, seconds per prefill. A 2-D input is one GEMM.
    - For a single bf16 row on CPU (batch-1 decode), oneDNN's GEMV streams
      about half the memory bandwidth of ATen's own kernel (8192x2048, one
      thread: 2.8 vs 1.5 ms), and dstp's four-stream kernel about 1.3x ATen's;
      from two rows on oneDNN is faster.
    """
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 1 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
        out = _single_row_bf16(flat, weight, bias)
    else:
        out = F.linear(flat, weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def _single_row_bf16(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """dstp's streaming GEMV when built (see cpu_kernels), else ATen's (not oneDNN's)."""
    if not (torch.is_grad_enabled() and weight.requires_grad):  # the kernel has no backward
        bias_ok = bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous())
        if weight.is_contiguous() and bias_ok:
            out = cpu_kernels.gemv_bf16(x.contiguous(), weight, bias)
            if out is not None:
                return out
    with _aten_cpu_kernels():
        return F.linear(x, weight, bias)


@contextlib.contextmanager
def _aten_cpu_kernels() -> Iterator[None]:
    """oneDNN off for the enclosed ops (thread-local enough: one engine thread per process)."""
    previous = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(previous)


def _empty_param(shape: tuple[int, ...], dtype: torch.dtype, device: Any) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def load_replicated(param: torch.Tensor, source: Any) -> None:
    """Default loader: the full tensor, unchanged (norms, biases of row layers...)."""
    shape = tuple(source.shape)
    if shape != tuple(param.shape):
        raise ValueError(f"checkpoint shape {shape} != parameter {tuple(param.shape)}")
    copy_slice(param.data, source, slice(None) if shape else ())


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's output rows split: each rank computes its features."""

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
        super().__init__()
        self.tp = tp
        self.partition = partition
        self.in_features = in_features
        self.out_features = partition.local_size
        self.transposed = transposed  # checkpoint stores (in, out)
        self.gather_output = gather_output
        self.weight = _empty_param((self.out_features, in_features), dtype, device)
        self.weight.weight_loader = self.load_weight
        self.bias = _empty_param((self.out_features,), dtype, device) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.load_bias

    def load_weight(self, param: torch.Tensor, source: Any) -> None:
        if self.transposed:
            param.data.copy_(self.partition.take(source, dim=1).t())
        else:
            self.partition.read_into(param.data, source, dim=0)

    def load_bias(self, param: torch.Tensor, source: Any) -> None:
        self.partition.read_into(param.data, source, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear_2d(x, self.weight, self.bias)
        return self.tp.all_gather(y, dim=-1) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}/{self.partition.full_size}, tp={self.tp.size}"


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's input columns split; one all-reduce sums the parts.

    The input arrives already split (it is a column-parallel layer's output),
    and the bias is added once, after the reduction.
    """

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
        super().__init__()
        self.tp = tp
        self.partition = partition
        self.in_features = partition.local_size
        self.out_features = out_features
        self.transposed = transposed
        self.weight = _empty_param((out_features, self.in_features), dtype, device)
        self.weight.weight_loader = self.load_weight
        self.bias = _empty_param((out_features,), dtype, device) if bias else None

    def load_weight(self, param: torch.Tensor, source: Any) -> None:
        if self.transposed:
            param.data.copy_(self.partition.take(source, dim=0).t())
        else:
            self.partition.read_into(param.data, source, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(linear_2d(x, self.weight))
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
        self.weight = _empty_param((self.per_rank, hidden), dtype, device)
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
        self.bias = _empty_param((self.per_rank,), dtype, device) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.load_weight

    def _local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear_2d(hidden, self.weight, self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather(self._local_logits(hidden), dim=-1)[..., : self.vocab_size]

    def logits_on_driver(self, hidden: torch.Tensor) -> torch.Tensor | None:
        full = self.tp.gather_to_driver(self._local_logits(hidden), dim=-1)
        return None if full is None else full[..., : self.vocab_size]


class AllReduceOutput:
    """Forward hook that sums a module's partial output over the TP group."""

    def __init__(self, tp: TPGroup) -> None:
        self.tp = tp

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(output)


def _sliced_loader(partition: Partition, dim: int):
    def load(param: torch.Tensor, source: Any) -> None:
        param.data.copy_(partition.take(source, dim=dim))

    return load


def shard_experts(
    module: nn.Module,
    gate_up: str,
    down: str,
    gate_up_parts: Sequence[str],
    heads: Any,
    tp: TPGroup,
    dtype: torch.dtype | None,
) -> tuple[Partition, Partition]:
    """Cut a fused-experts module in place: every expert's MLP split Megatron-style.

    ``gate_up`` is ``(experts, out, hidden)``: its output dimension splits
    (each rank takes its slice of every part). ``down`` is ``(experts,
    hidden, inner)``: its input dimension splits the same way, so each rank
    computes a partial sum of every expert's output; one all-reduce of the
    module's output (after routing weights, which are linear) completes it.
    The HF module and its forward stay: only its parameters shrink.
    """
    gate_up_param = getattr(module, gate_up)
    down_param = getattr(module, down)
    experts, gate_up_out, hidden = gate_up_param.shape
    column = partition_for(gate_up_parts, gate_up_out, heads, tp.rank, tp.size)
    row = partition_for(("even",), down_param.shape[2], heads, tp.rank, tp.size)
    for attr, shape, partition, dim in (
        (gate_up, (experts, column.local_size, hidden), column, 1),
        (down, (experts, down_param.shape[1], row.local_size), row, 2),
    ):
        param = _empty_param(shape, dtype, "meta")
        param.weight_loader = _sliced_loader(partition, dim)
        setattr(module, attr, param)
    module.register_forward_hook(AllReduceOutput(tp))
    return column, row
