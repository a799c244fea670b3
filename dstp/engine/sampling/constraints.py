"""Grammar masks applied to a batch's logits: one batched op per step (the bitmask goes up
inside the step's packed upload, step.py).

The mask becomes an additive bias (0 where allowed, -inf where not) by one gather from a
256-entry table indexed by the bitmask's bytes, then one add: about 7x faster on a CPU
than unpacking the bits with shifts and masking (benchmarks/FINDINGS.md, issue 23), and
plain tensor ops on any device.
"""

from __future__ import annotations

import sys

import torch

NEG_INF = float("-inf")
_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def constrain(x: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``x`` with every token a row's bitmask forbids set to -inf, as a new tensor.

    ``bitmask`` is llguidance's packed form (``[rows, words]`` int32, bit j of word w allows
    token 32w + j); rows without a grammar are all ones, so they come back unchanged
    (adding 0 leaves every finite logit as it was).
    """
    bits = bitmask if bitmask.device == x.device else bitmask.to(x.device)
    byte_ids = bits.contiguous().view(torch.uint8).view(-1).to(torch.int32)
    bias = _table(x.device, x.dtype).index_select(0, byte_ids).view(bits.shape[0], -1)
    width = x.shape[1]
    if bias.shape[1] < width:  # logits wider than the tokenizer's vocabulary: never allowed
        bias = torch.nn.functional.pad(bias, (0, width - bias.shape[1]), value=NEG_INF)
    return x + bias[:, :width]


def _table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: byte b's eight tokens as biases (bit j of b allows its j-th token), made
    once per device and dtype (per step it would be an upload on a GPU)."""
    assert sys.byteorder == "little", "the bitmask's bytes are read in little-endian order"
    table = _TABLES.get((device, dtype))
    if table is None:
        bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
        table = torch.zeros(256, 8, dtype=dtype).masked_fill_(bits == 0, NEG_INF).to(device)
        _TABLES[(device, dtype)] = table
    return table
