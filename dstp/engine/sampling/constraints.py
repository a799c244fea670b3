"""Grammar masks applied to a batch's logits: one batched op per step (the bitmask goes up
inside the step's packed upload, step.py)."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
_SHIFTS: dict[torch.device, torch.Tensor] = {}


def constrain(x: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``x`` with every token a row's bitmask forbids set to -inf, as a new tensor.

    ``bitmask`` is llguidance's packed form (``[rows, words]`` int32, bit j of word w allows
    token 32w + j); rows without a grammar are all ones, so they come back unchanged.
    """
    bits = bitmask if bitmask.device == x.device else bitmask.to(x.device)
    allowed = (bits.unsqueeze(-1) >> _shifts(x.device)).bitwise_and_(1)
    allowed = allowed.view(bits.shape[0], -1)
    width = x.shape[1]
    if allowed.shape[1] < width:  # logits wider than the tokenizer's vocabulary
        allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]))
    return x.masked_fill(allowed[:, :width] == 0, NEG_INF)


def _shifts(device: torch.device) -> torch.Tensor:
    """0..31 on ``device``, made once (a per-step arange would be an upload on a GPU)."""
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    return shifts
