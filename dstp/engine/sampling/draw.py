"""The draw: a blocked argmax for greedy rows, exponential races for sampled ones.

Draws are exponential races, argmax(p / E) with E ~ Exp(1), which sample p
exactly. Over a whole vocabulary the race runs in two levels (a block of 256 tokens,
then a token in it), so it needs ~V / 256 + 256 noise values per draw, not V. Each
draw's noise is a hash of its counter key (step.py plans the keys: a seeded row's from
its sequence, state.py's ``draw_keys``) and the block or token index, so a seeded
row's tokens do not depend on the rest of the batch, the TP size, a replay or the path.

On the CPU with dstp's kernels (step.py's ``fused_ops``) the sampled rows are drawn by one
call (csrc/sampler_ops.cpp's ``sample_rows``); elsewhere by the plain ops below, with the
same rule (stated per element in tests/helpers/reference_sampler.py's ``keyed_draw``).
"""

from __future__ import annotations

import functools
import math
from types import ModuleType

import torch

from dstp.engine.sampling.filters import candidates
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


# -- sampled rows: keyed races ------------------------------------------------------------
#
# Every draw is keyed (state.py's ``draw_keys``; an unseeded row's key comes from one random
# word per step), and its noise is a hash of the key and an index: noise number i of a draw
# keyed k is E = -log(u), u = (the top 53 bits of splitmix64(k + (i + 1) * golden) + 1/2) / 2**53.
# The race runs in two levels, as csrc/sampler_ops.cpp's: a block of ``BLOCK`` tokens by
# argmax(block mass / E(b)), then a token of that block by argmax(p / E(INSIDE + token)). So
# each path (the CPU's kernels, the plain ops here, a GPU) draws the same token for a key, up
# to the float rounding of the probabilities, with no generator state: fixed int64 and
# float64 ops over [slots, blocks] and [slots, BLOCK], no per-row op, no host read.

BLOCK = 256  # the race's first level: blocks of this many tokens (sampler_ops.cpp's kBlock)
INSIDE = 1 << 32  # the second level's noise indices start here (kInside)
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # splitmix64's constants as int64 (two's complement)
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """A logical right shift of int64 words (torch's is arithmetic): shift, then mask."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 words (the uint64's bits): int64 products wrap as
    uint64's do, so no device needs unsigned ops."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def splitmix64(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """splitmix64(key + (index + 1) * golden), broadcast, as int64 words."""
    return _mix(keys + (index + 1) * _GOLDEN)


def _log_uniform(start: torch.Tensor) -> torch.Tensor:
    """log(u) (float64) of the noise whose splitmix64 input is ``start``: -E, so that
    argmax(w / E) is argmin(w / log u) exactly, one negation fewer."""
    return _shr(_mix(start), 11).double().add_(0.5).mul_(2.0**-53).log_()


def exp_noise(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise (float64) number ``index`` of the draws keyed ``keys`` (broadcast)."""
    return _log_uniform(keys + (index + 1) * _GOLDEN).neg_()


def _keyed_argmax(weights: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Each row's argmax of weights / E, E the noise started at ``start`` (key + (index + 1)
    * golden): the first one on ties, as the kernel's."""
    return (weights / _log_uniform(start)).argmin(-1)


def _steps(n: int, device: torch.device) -> torch.Tensor:
    """(index + 1) * golden for index < n: each noise index's step from its key."""
    return torch.arange(1, n + 1, device=device) * _GOLDEN


def _race_whole_rows(probs: torch.Tensor, row_of_slot: torch.Tensor, keys: torch.Tensor):
    """Token drawn for each slot from its row of [R, V] ``probs`` by its key: a block by its
    mass, then a token in that block."""
    pad = -probs.shape[1] % BLOCK
    if pad:
        probs = torch.nn.functional.pad(probs, (0, pad))
    blocks = probs.view(len(probs), -1, BLOCK)
    # float32 sums (a float64 sum is ~20x slower on a CPU); the race divides in float64
    sums = blocks.sum(-1).index_select(0, row_of_slot)
    steps = _steps(max(sums.shape[1], BLOCK), probs.device)
    block = _keyed_argmax(sums, keys.unsqueeze(1) + steps[: sums.shape[1]])
    first = block * BLOCK
    # token t of the block is noise index INSIDE + first + t: its step, split in two
    start = (keys + (first + INSIDE) * _GOLDEN).unsqueeze(1) + steps[:BLOCK]
    return first + _keyed_argmax(blocks[row_of_slot, block], start)


def _race_ids(
    probs: torch.Tensor,
    ids: torch.Tensor,
    row_of_slot: torch.Tensor,
    keys: torch.Tensor,
    vocab: int,
) -> torch.Tensor:
    """The same keyed race over rows whose kept tokens are ``ids`` [R, K] (the CPU's prefix,
    zero probability elsewhere): block masses summed from the prefix, then the race among the
    prefix's tokens in the drawn block."""
    p, ids = probs.index_select(0, row_of_slot), ids.index_select(0, row_of_slot)
    owner = ids // BLOCK
    blocks = -(-vocab // BLOCK)
    sums = p.new_zeros(len(p), blocks).scatter_add_(1, owner, p)
    keys = keys.unsqueeze(1)
    block = _keyed_argmax(sums, keys + _steps(blocks, p.device))
    inside = torch.where(owner == block.unsqueeze(1), p, 0.0)
    column = _keyed_argmax(inside, keys + (ids + (INSIDE + 1)) * _GOLDEN)
    return ids.gather(1, column.unsqueeze(1)).squeeze(1)


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
            won = _race_whole_rows(probs, group.row_of_slot, group.keys)
        else:
            won = _race_ids(probs, ids, group.row_of_slot, group.keys, x.shape[1])
        picked.index_copy_(0, group.slots, won)

    if found.prefix is not None:
        draw(found.prefix, found.prefix_probs, found.ids)
    if found.whole is not None:
        draw(found.whole, found.whole_probs)
    return picked
