"""Surgery on fused MoE experts modules: every expert's MLP cut Megatron-style.

Unlike linears, an experts module is not swapped for a dstp layer: the HF
module and its forward (routing included) stay, only its 3D parameters
shrink to this rank's slice, and a hook all-reduces its output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dstp.distributed import TPGroup
from dstp.model.layers import Partition, empty_param, partition_for
from dstp.policies import Experts, HeadLayout


class AllReduceOutput:
    """Forward hook that sums a module's partial output over the TP group."""

    def __init__(self, tp: TPGroup) -> None:
        self.tp = tp

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(output)


def _sliced_loader(partition: Partition, dim: int) -> Callable[[torch.Tensor, Any], None]:
    """A ``weight_loader`` taking ``partition`` of dimension ``dim`` of every expert."""

    def load(param: torch.Tensor, source: Any) -> None:
        param.data.copy_(partition.take(source, dim=dim))

    return load


def shard_experts(
    name: str,
    module: nn.Module,
    style: Experts,
    heads: HeadLayout,
    tp: TPGroup,
    dtype: torch.dtype | None,
) -> tuple[Partition, Partition]:
    """Cut the fused-experts module ``name`` in place; returns (gate_up, down) partitions.

    ``gate_up`` is ``(experts, out, hidden)``: its output dimension splits
    (each rank takes its slice of every part). ``down`` is ``(experts,
    hidden, inner)``: its input dimension splits the same way, so each rank
    computes a partial sum of every expert's output; one all-reduce of the
    module's output (after routing weights, which are linear) completes it.
    Each parameter also notes where unfused checkpoints keep every expert.
    """
    gate_up_param = getattr(module, style.gate_up)
    down_param = getattr(module, style.down)
    experts, gate_up_out, hidden = gate_up_param.shape
    column = partition_for(style.gate_up_parts, gate_up_out, heads, tp.rank, tp.size)
    row = partition_for(("even",), down_param.shape[2], heads, tp.rank, tp.size)
    for attr, shape, partition, dim in (
        (style.gate_up, (experts, column.local_size, hidden), column, 1),
        (style.down, (experts, down_param.shape[1], row.local_size), row, 2),
    ):
        param = empty_param(shape, dtype, "meta")
        param.weight_loader = _sliced_loader(partition, dim)
        setattr(module, attr, param)
    module.register_forward_hook(AllReduceOutput(tp))
    for attr, templates in style.per_expert().items():
        getattr(module, attr).unfused_keys = [
            [f"{name}.{template.format(e=e)}" for template in templates] for e in range(experts)
        ]
    return column, row
