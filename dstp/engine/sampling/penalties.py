"""Penalties and the stop-id mask: edits at the few ids a row has seen.

Penalties and the stop-token mask touch only the ids a row has seen, so they
are written into the logits in place at those ids and undone before the
sampler returns, rather than copying the batch. Their inputs (the seen ids, the
stop ids, the per-row penalties) are planned in step.py and come in the step's
one upload; the counts are made on the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dstp.engine.sampling.step import FusedPenalties, Penalties, Step

NEG_INF = float("-inf")

Edit = tuple[torch.Tensor, torch.Tensor]  # (flat positions in the logits, new values)


def edits(x: torch.Tensor, step: Step) -> list[Edit]:
    """(flat positions, new values) to write into x: penalties, then stop ids before min_tokens."""
    if isinstance(step.penalties, FusedPenalties) or (
        step.ops is not None and step.stops is not None
    ):
        return [_fused_edit(x, step)]
    found = [_penalty_edit(x, step.penalties), _stop_edit(x, step.stops)]
    return [edit for edit in found if edit is not None]


def _penalty_edit(x: torch.Tensor, seen: Penalties | None) -> Edit | None:
    """Penalised values at each penalised row's seen ids, as the oracle computes them.

    Repetition divides positive and multiplies negative logits of every seen id;
    presence and frequency subtract from ids in the output only, by their count there.
    A neutral penalty (1, 0) leaves a value bitwise unchanged, so rows share one formula.
    The positions are each row's distinct prompt ids and every output id, repeats
    included: each copy of a position gets the same value (from the same logit and the
    same count), so writing them all is writing it once. Counts come from a sort of the
    output positions and two binary searches: fixed shapes, nothing read back (no
    ``repeat_interleave``, whose output size a GPU would read back).
    """
    if seen is None:
        return None
    vocab = x.shape[1]
    entry = torch.arange(seen.prompt_total, device=x.device)  # each prompt id's row, found in
    owner = torch.searchsorted(seen.prompt_sizes.cumsum(0), entry, right=True)  # fixed shapes
    base = seen.prompt_base[owner]
    flat = torch.cat([torch.cat(seen.prompts) + base, seen.output])
    ordered = seen.output.sort().values
    count = torch.searchsorted(ordered, flat, right=True) - torch.searchsorted(ordered, flat)
    count = count.to(x.dtype)
    row = flat // vocab  # ids are non-negative
    rep, freq, pres = seen.repetition[row], seen.frequency[row], seen.presence[row]
    values = x.view(-1)[flat]
    values = torch.where(values > 0, values / rep, values * rep)
    values = values - torch.where(count > 0, freq * count + pres, 0.0)
    return flat, values


def _fused_edit(x: torch.Tensor, step: Step) -> Edit:
    """Both edits in one call of the fused CPU op (csrc/sampler_ops.cpp), by the same rule:
    one value per distinct position, a stop id's -inf over its penalty."""
    seen = step.penalties
    stops = step.stops if step.stops is not None else torch.empty(0, dtype=torch.long)
    if seen is None:
        no_rows = torch.empty(0, dtype=torch.long)
        no_values = torch.empty(0, dtype=torch.float32)
        args = ([], no_rows, no_rows, no_rows, no_rows, no_values, no_values, no_values)
    else:
        args = (
            seen.prompts,
            seen.rows,
            seen.pool,
            seen.output_start,
            seen.output_sizes,
            seen.repetition,
            seen.frequency,
            seen.presence,
        )
    return step.ops.penalty_edit(x, *args, stops)


def _stop_edit(x: torch.Tensor, stops: torch.Tensor | None) -> Edit | None:
    """-inf at the stop ids of rows that have not reached min_tokens yet."""
    if stops is None:
        return None
    return stops, torch.full(stops.shape, NEG_INF, device=x.device)


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
