"""The one transfer back to the host per step, with a typed layout.

Only the tokens, a status per row and the logprobs asked for come back, in one
device-to-host copy (on the CPU only, where it is a read of host memory, a flag
per row comes back earlier when some row took the prefilter path; step.py). The parts are packed in a fixed order and split again by
their sizes, which the host knows from the shapes without reading the device.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from dstp.engine.sampling.logprobs import LogprobTensors


class RowStatus(enum.IntEnum):
    """A row's outcome, sent back with its tokens."""

    OK = 0
    BROKEN = 1  # non-finite logits
    MASKED = 2  # every token masked


@dataclass
class Readback:
    """One step's results on the host."""

    tokens: list[int]  # one per draw slot
    status: list[RowStatus]  # one per row
    logprob_rows: list[int] = field(default_factory=list)  # the rows that asked, batch order
    chosen: list[float] = field(default_factory=list)  # one per slot of those rows
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per row: (id, logprob)


def read_back(
    tokens: torch.Tensor, status: torch.Tensor, logprobs: LogprobTensors | None
) -> Readback:
    """Copy every part to the host in one transfer, and split it back by name."""
    parts: dict[str, torch.Tensor] = {"tokens": tokens, "status": status}
    if logprobs is not None:
        parts["chosen"] = logprobs.chosen
        if logprobs.top_ids is not None:
            parts["top_values"], parts["top_ids"] = logprobs.top_values, logprobs.top_ids
    flat = torch.cat([t.double().flatten() for t in parts.values()]).tolist()
    host: dict[str, list[float]] = {}
    taken = 0
    for name, tensor in parts.items():
        host[name] = flat[taken : taken + tensor.numel()]
        taken += tensor.numel()
    back = Readback([int(t) for t in host["tokens"]], [RowStatus(int(s)) for s in host["status"]])
    if logprobs is not None:
        back.logprob_rows, back.chosen = logprobs.rows, host["chosen"]
        back.top = _top_pairs(host.get("top_ids", []), host.get("top_values", []), logprobs)
    return back


def _top_pairs(
    ids: list[float], values: list[float], logprobs: LogprobTensors
) -> list[list[tuple[int, float]]]:
    """Each asking row's top (id, logprob) pairs, best first, from the flat [rows, k] parts;
    tokens a grammar forbids (logprob -inf, not a JSON number) are left out."""
    k = logprobs.k
    return [
        [
            (int(token), value)
            for token, value in zip(
                ids[j * k : (j + 1) * k], values[j * k : (j + 1) * k], strict=True
            )
            if value != float("-inf")
        ]
        for j in range(len(logprobs.rows))
    ]
