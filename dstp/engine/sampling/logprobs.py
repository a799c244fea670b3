"""Logprobs of the model's raw distribution (before penalties and temperature), as vLLM's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dstp.engine.sampling.filters import select
from dstp.engine.sampling.state import DrawSlots, SampleState


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


def logprob_tensors(
    x: torch.Tensor, states: list[SampleState], draws: list[int], tokens: torch.Tensor
) -> LogprobTensors | None:
    """The drawn tokens' logprobs and each asking row's top k, or None when no row asked."""
    rows = [i for i, state in enumerate(states) if state.params.logprobs is not None]
    if not rows:
        return None
    device = x.device
    raw = torch.log_softmax(select(x, rows), dim=-1)
    slots = DrawSlots(states, draws, device)
    chosen = raw[slots.row_of_slot(rows), tokens[torch.tensor(slots.of(rows), device=device)]]
    k = max(states[i].params.logprobs for i in rows)
    if k == 0:
        return LogprobTensors(rows, chosen, None, None)
    top = raw.topk(k, dim=-1)
    return LogprobTensors(rows, chosen, top.values, top.indices)
