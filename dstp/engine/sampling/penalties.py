"""Penalties and the stop-id mask: edits at the few ids a row has seen.

Penalties and the stop-token mask touch only the ids a row has seen, so they
are written into the logits in place at those ids and undone before the
sampler returns, rather than copying the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dstp.engine.sampling.state import SampleState
from dstp.engine.sampling_params import SamplingParams

NEG_INF = float("-inf")

Edit = tuple[torch.Tensor, torch.Tensor]  # (flat positions in the logits, new values)


def edits(x: torch.Tensor, states: list[SampleState]) -> list[Edit]:
    """(flat positions, new values) to write into x: penalties, then stop ids before min_tokens."""
    found = [_penalty_edit(x, states), _stop_edit(x, states)]
    return [edit for edit in found if edit is not None]


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)


def _penalty_edit(x: torch.Tensor, states: list[SampleState]) -> Edit | None:
    """Penalised values at each penalised row's seen ids, as the oracle computes them.

    Repetition divides positive and multiplies negative logits of every seen id;
    presence and frequency subtract from ids in the output only. A neutral
    penalty (1, 0) leaves a value bitwise unchanged, so rows share one formula.
    """
    rows = [i for i, state in enumerate(states) if _penalised(state.params)]
    if not rows:
        return None
    device, vocab = x.device, x.shape[1]
    counts = [states[i].token_counts(device) for i in rows]
    sizes = torch.tensor([c.ids.numel() for c in counts], device=device)

    def per_id(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=x.dtype, device=device).repeat_interleave(sizes)

    if any(c.largest >= vocab for c in counts):
        raise IndexError(f"a prompt or output id is outside the vocabulary of {vocab}")
    params = [states[i].params for i in rows]
    offsets = torch.tensor(rows, device=device).mul_(vocab).repeat_interleave(sizes)
    flat = torch.cat([c.ids for c in counts]) + offsets
    in_output = torch.cat([c.in_output for c in counts])
    rep = per_id([p.repetition_penalty for p in params])
    freq = per_id([p.frequency_penalty for p in params])
    pres = per_id([p.presence_penalty for p in params])
    values = x.view(-1)[flat]
    values = torch.where(values > 0, values / rep, values * rep)
    values = values - torch.where(in_output > 0, freq * in_output + pres, 0.0)
    return flat, values


def _stop_edit(x: torch.Tensor, states: list[SampleState]) -> Edit | None:
    """-inf at the stop ids of rows that have not reached min_tokens yet."""
    vocab = x.shape[1]
    masked = [
        (i, token)
        for i, state in enumerate(states)
        if len(state.output_ids) < state.params.min_tokens
        for token in state.stop_ids
    ]
    if not masked:
        return None
    if not all(0 <= token < vocab for _, token in masked):
        raise IndexError(f"a stop id is outside the vocabulary of {vocab}")
    flat = [i * vocab + token for i, token in masked]
    where = torch.tensor(flat, dtype=torch.long, device=x.device)
    return where, torch.full((len(flat),), NEG_INF, device=x.device)


@contextmanager
def written(x: torch.Tensor, changes: list[Edit]) -> Iterator[None]:
    """Write ``changes`` into x in place, and put the original values back on exit."""
    flat_x = x.view(-1)
    undo = []
    try:
        for where, values in changes:
            undo.append((where, flat_x[where]))
            flat_x[where] = values
        yield
    finally:
        for where, values in reversed(undo):
            flat_x[where] = values
