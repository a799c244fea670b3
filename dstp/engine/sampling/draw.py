"""The draw: a blocked argmax for greedy rows, exponential races for sampled ones.

Draws are exponential races, argmax(p / E) with E ~ Exp(1), which sample p
exactly. Over a whole vocabulary the race runs in two levels (a block, then a
token in it), so it needs ~2 sqrt(V) noise values per draw, not V. A seeded
request draws its noise from its own generator, so its tokens do not depend
on the rest of the batch or on the TP size; the rest share one draw.

On the CPU with dstp's kernels (step.py's ``fused_ops``) the sampled rows are drawn by one
call instead, with the same two-level race over blocks of 256 tokens, its noise a hash of
each draw's counter key and the block or token index (no generator state; the rule is
stated per element in tests/helpers/reference_sampler.py's ``keyed_draw``).
"""

from __future__ import annotations

import functools
import math
from types import ModuleType

import torch

from dstp.engine.sampling.filters import candidates
from dstp.engine.sampling.state import Generators
from dstp.engine.sampling.step import Group, Step

NEG_INF = float("-inf")


# -- greedy: a blocked argmax ---------------------------------------------------------------


@functools.lru_cache
def _block_width(vocab: int) -> int:
    """About sqrt(vocab), a divisor of it when one is near (no padding copy then)."""
    root = max(1, math.isqrt(vocab))
    for delta in range(root // 2 + 1):
        for width in (root - delta, root + delta):
            if width > 0 and vocab % width == 0:
                return width
    return root


def _blocks(x: torch.Tensor, fill: float) -> torch.Tensor:
    """[R, V] seen as [R, blocks, width], the last block padded with ``fill`` if need be."""
    width = _block_width(x.shape[1])
    pad = -x.shape[1] % width
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.view(x.shape[0], -1, width)


def max_and_argmax(
    x: torch.Tensor, ops: ModuleType | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's max (NaN if it has one) and first argmax, like ``x.max(-1)``.

    With ``ops`` (the fused CPU ops, step.py's ``fused_ops``) in one call; else reduced in
    blocks: on CPU torch's ``amax`` is vectorised and ``argmax`` is not, so this is ~5x
    faster at 128k vocabularies.
    """
    if ops is not None:
        return ops.row_max_argmax(x)
    blocks = _blocks(x, NEG_INF)
    block_max = blocks.amax(-1)
    best = block_max.argmax(-1)  # the first block holding the max
    inside = blocks[torch.arange(len(x), device=x.device), best].argmax(-1)
    return block_max.amax(-1), best * blocks.shape[2] + inside


# -- sampled rows: races --------------------------------------------------------------------


def _noise(gens: Generators, width: int, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [len(gens), width]: a seeded slot's from its own generator, so its token
    does not depend on the rest of the batch; the others from one batched draw."""
    noise = torch.empty(len(gens), width, device=device).exponential_()
    for slot, gen in enumerate(gens):
        if gen is not None:
            noise[slot].exponential_(generator=gen)
    return noise


def _race(weights: torch.Tensor, gens: Generators) -> torch.Tensor:
    """Column drawn from each row of ``weights`` (unnormalised probabilities): argmax(p / E)."""
    noise = _noise(gens, weights.shape[1], weights.device)
    tiny = torch.finfo(noise.dtype).tiny  # E = 0 would let a zero-probability token win
    return (weights / noise.clamp_min(tiny)).argmax(-1)


def _race_whole_rows(
    probs: torch.Tensor, row_of_slot: torch.Tensor, gens: Generators
) -> torch.Tensor:
    """Token drawn for each slot from its row of [R, V] ``probs``: a block by its mass, then a
    token in that block. The same distribution as one race over V, for ~2 sqrt(V) noise
    values per draw instead of V."""
    blocks = _blocks(probs, 0.0)
    block = _race(blocks.sum(-1)[row_of_slot], gens)
    inside = _race(blocks[row_of_slot, block], gens)
    return block * blocks.shape[2] + inside


def tokens(
    x: torch.Tensor, step: Step, argmax: torch.Tensor, unusable: torch.Tensor
) -> torch.Tensor:
    """One token per draw slot (row i's draws are consecutive slots), on the device."""
    picked = argmax.index_select(0, step.slot_rows)
    if step.fused is not None:  # the CPU's fused filter and keyed draw, every sampled row
        fused, params = step.fused, step.params
        step.ops.sample_rows(
            x, fused.rows, fused.starts, fused.slots, fused.keys,
            params.temperature, params.top_k, params.top_p, params.min_p, picked,
        )  # fmt: skip
        return picked
    if step.prefix is None and step.whole is None:  # greedy rows only
        return picked
    found = candidates(x, step, unusable)

    def draw(group: Group, probs: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Race each of the group's slots over its row of ``probs`` (over ``ids`` if given)."""
        if ids is None:
            won = _race_whole_rows(probs, group.row_of_slot, group.gens)
        else:
            columns = _race(probs[group.row_of_slot], group.gens)
            won = ids[group.row_of_slot].gather(1, columns.unsqueeze(1)).squeeze(1)
        picked.index_copy_(0, group.slots, won)

    if found.prefix is not None:
        draw(found.prefix, found.prefix_probs, found.ids)
    if found.whole is not None:
        draw(found.whole, found.whole_probs)
    return picked
