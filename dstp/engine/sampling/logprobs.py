"""Logprobs of the model's raw distribution (before penalties and temperature), as vLLM's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dstp.engine.sampling.filters import select
from dstp.engine.sampling.step import Step


@dataclass
class LogprobTensors:
    """On the device, for the rows that asked for logprobs (``rows``, in batch order)."""

    rows: list[int]
    chosen: torch.Tensor  # [slots of rows] the drawn tokens' logprobs
    top_values: torch.Tensor | None  # [len(rows), k], best first; None when k = 0
    top_ids: torch.Tensor | None  # [len(rows), k]

    @property
    def k(self) -> int:
        return 0 if self.top_ids is None else self.top_ids.shape[1]


def logprob_tensors(x: torch.Tensor, step: Step, tokens: torch.Tensor) -> LogprobTensors | None:
    """The drawn tokens' logprobs and each asking row's top k, or None when no row asked."""
    group = step.logprobs
    if group is None:
        return None
    raw = torch.log_softmax(select(x, group.index), dim=-1)
    chosen = raw[group.row_of_slot, tokens[group.slots]]
    k = max(step.states[i].params.logprobs for i in group.rows)
    if k == 0:
        return LogprobTensors(group.rows, chosen, None, None)
    top = raw.topk(k, dim=-1)
    return LogprobTensors(group.rows, chosen, top.values, top.indices)
