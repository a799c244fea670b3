"""Top-k, top-p and min-p: each rule written once, applied on two paths, no sort of whole rows.

The cut rules, exact and independent of any order of the row (tests/helpers/reference_sampler.py
states them the same way, computed by another method):

- temperature: ``z = logits / temperature`` (float32).
- top-k: keep ``z >= `` the row's k-th largest ``z`` (every token tied with it stays).
- top-p: each token's weight is ``w = exp(z - max z)`` (float32, 1 for the largest, 0
  where top-k cut) and its mass ``m = floor(w * 2**MASS_BITS)`` (2**30), an integer, so
  that masses add up exactly in any order (a token more than ~20.8 nats below the row's
  largest has mass 0). A token is kept when the mass of the tokens with a
  strictly larger weight is at most ``budget = floor(float64(top_p) * float64(sum m))``
  (``top_p`` rounded to float32 first, as the device holds it): the smallest set of whole
  weight classes whose mass reaches top_p, as vLLM's and HF's ``cumsum - p > top_p`` but
  with tokens tied at the cut kept or dropped together, never split by a sort's order.
- min-p: drop a token whose weight ``w`` (after top-p) is below ``min_p`` (float32), which
  is ``p < min_p * p_max`` without the softmax's rounding.

Filtering looks first at each row's ``PREFILTER`` largest logits, from one batched
``topk`` (sorting a whole vocabulary costs ~15x more). A row whose kept set might reach
past that prefix (say a flat distribution whose prefix mass is below top_p) is filtered
again over its whole row, where top-p finds its cut by a radix select over the bits of
the weights (two passes of 14 bits, each an integer histogram of mass per row): fixed
work per row, batched, no sort and no host read (~1 ms a 128k-token row on one CPU
thread, against ~11 ms for the sort it replaces). Choosing the fallback rows reads a flag
per row back mid-step, so only the CPU takes the prefix path; an accelerator filters
every sampled row over its whole row (step.py says why). With dstp's CPU kernels built the
CPU takes neither: csrc/sampler_ops.cpp's ``sample_rows`` applies these rules to whole rows
in one call (the same radix select, per row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dstp.engine.sampling.step import PREFILTER, Group, RowParams, Step

NEG_INF = float("-inf")


# -- the filters -----------------------------------------------------------------------------


def top_k(
    z: torch.Tensor, k: torch.Tensor, largest: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """z with -inf below each row's k-th largest value (k = 0: off), and that value [R, 1].

    z is sorted descending when ``largest`` is None; otherwise it is searched with
    ``topk(largest)``, ``largest`` being the biggest k (known on the host).
    """
    ordered = z if largest is None else z.topk(largest, dim=-1).values
    kth = ordered.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
    return z.masked_fill((k > 0).unsqueeze(1) & (z < kth), NEG_INF), kth


MASS_BITS = 30  # a token's top-p mass is floor(weight * 2**30): an int32, summed in int64
_ONE = 0x3F800000  # float32 1.0's bits: scaled weights below it carry no mass, and no cut
_TOP = 0x4E800000  # float32 2**30's bits: the largest scaled weight's
_RADIX = 14  # the bits in between, fewer than 2**28: two passes of 14
_LOW = _ONE >> _RADIX
_BINS = ((_TOP - _ONE) >> _RADIX) + 1  # the first pass's bins
_CHUNK = 1 << 18  # logits per block of rows on the CPU (~1 MiB: the histograms stay in cache)


def weights(z: torch.Tensor, row_max: torch.Tensor | None = None) -> torch.Tensor:
    """``exp(z - max z)`` per row: 1 at the largest, 0 at -inf."""
    if row_max is None:
        row_max = z.amax(-1, keepdim=True)
    return (z - row_max).exp_()


def masses(w: torch.Tensor) -> torch.Tensor:
    """Each weight's top-p mass, an integer (int64): exact sums in any order. Scales ``w``
    by 2**MASS_BITS in place (exact: the same order and ties)."""
    return w.mul_(2.0**MASS_BITS).int().long()


def budgets(top_p: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The most mass that may lie strictly above a kept token: floor(top_p * total)."""
    return (top_p.double() * total.double()).long()


def outside_top_p(
    w: torch.Tensor, mass: torch.Tensor, total: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Over weights sorted descending and their masses, what lies outside the top-p set (the
    module's rule). ``total`` is the row's whole mass: the prefix's for a row whose prefix
    holds every token with mass (top-k), the whole row's otherwise.
    """
    above = mass.cumsum(-1) - mass  # the mass strictly before each token in this order
    first = torch.ones_like(w, dtype=torch.bool)
    first[:, 1:] = w[:, 1:] != w[:, :-1]
    # a tied token has its class's first member's mass above it (it only grows along the row)
    above = torch.where(first, above, 0).cummax(-1).values
    drop = above > budgets(top_p, total).unsqueeze(1)
    return drop & (top_p < 1.0).unsqueeze(1)


def top_p_threshold(z: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """z with -inf outside each row's top-p set, for rows in vocabulary order: no sort.

    On the CPU in blocks of rows of about ``_CHUNK`` logits (fewer passes out of cache);
    elsewhere all rows at once.
    """
    for block in _row_blocks(z):
        z[block].masked_fill_(_outside_top_p_rows(z[block], top_p[block]), NEG_INF)
    return z


def _row_blocks(z: torch.Tensor) -> list[slice]:
    """z's rows in blocks of about ``_CHUNK`` logits on the CPU, in one block elsewhere."""
    rows = len(z) if z.device.type != "cpu" else max(1, _CHUNK // max(1, z.shape[1]))
    return [slice(start, start + rows) for start in range(0, len(z), rows)]


def total_masses(x: torch.Tensor, temperature: torch.Tensor, row_max: torch.Tensor):
    """Each row's whole top-p mass [R] from its raw logits (blocks of rows on the CPU)."""
    return torch.cat([
        masses(weights(x[block] / temperature[block], row_max[block])).sum(-1)
        for block in _row_blocks(x)
    ])  # fmt: skip


def _outside_top_p_rows(z: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The module's top-p rule over whole rows, by a radix select on the weights' bits.

    With weights scaled by 2**MASS_BITS (exact), a token's mass is its scaled weight's
    integer part, and the scaled weight's float32 bits, read as an integer, order the
    weights. The kept set is every token whose bits are at least K, K being the smallest
    integer with at most ``budget`` mass on bits strictly above it: K falls on a kept
    weight, or between the last kept weight and the next smaller one. K is at least the
    bits of 1.0 (tokens below carry no mass, and the budget is below the total), so it
    has 28 bits to find: 14 from a histogram of each row's mass over its tokens' high
    bits, 14 from one over the low bits of the tokens in the bin found. Integer sums,
    so any order of adding (CPU threads, GPU atomics) gives the same K.
    """
    rows = len(z)
    w = weights(z).mul_(2.0**MASS_BITS)
    mass = w.int().long().view(-1)
    total = mass.view(rows, -1).sum(-1, keepdim=True)
    over = total - budgets(top_p, total.squeeze(1)).unsqueeze(1)  # mass at or below K, < over
    bits = w.view(torch.int32)
    # One histogram for all the rows: row r's bins start at r * bins. (NaN weights, of rows the
    # sampler reports broken, are clamped only to keep their index in bounds.)
    row = torch.arange(rows, dtype=torch.int32, device=z.device).unsqueeze(1)
    index = (bits >> _RADIX).clamp_(_LOW, _LOW + _BINS - 1).add_(row * _BINS - _LOW)
    hist = torch.zeros(rows * _BINS, dtype=torch.long, device=z.device)
    below = hist.index_add_(0, index.view(-1), mass).view(rows, _BINS).cumsum_(1)
    base = ((below < over).sum(1, keepdim=True, dtype=torch.int32) + _LOW) << _RADIX
    del index  # (kv_budget.py counts one index at a time)
    # The bin's 2**14 values, with a bin on either side for the tokens outside it.
    bins = (1 << _RADIX) + 2
    index = bits.sub(base).clamp_(-1, 1 << _RADIX).add_(row * bins + 1)
    hist = torch.zeros(rows * bins, dtype=torch.long, device=z.device)
    below = hist.index_add_(0, index.view(-1), mass).view(rows, bins).cumsum_(1)[:, 1:-1]
    cut = base + (below < over).sum(1, keepdim=True, dtype=torch.int32)
    return (bits < cut) & (top_p < 1.0).unsqueeze(1)


def below_min_p(z: torch.Tensor, min_p: torch.Tensor, row_max: torch.Tensor | None = None):
    """Where a token's weight exp(z - max z) is below min_p (min_p = 0: off)."""
    drop = weights(z, row_max) < min_p.unsqueeze(1)
    return drop & (min_p > 0.0).unsqueeze(1)


def select(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """x's rows at ``index`` (None: all of them, no copy)."""
    return x if index is None else x.index_select(0, index)


# -- the prefix path -----------------------------------------------------------------------


def prefix_candidates(
    x: torch.Tensor, group: Group
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids [R, K], probabilities [R, K], exact [R]) over each row's top K logits.

    ``exact`` says that the row's kept set provably lies inside the prefix, so
    these probabilities are the oracle's; rows without it need the whole row.
    """
    xs, params = select(x, group.index), group.params
    width = min(PREFILTER, x.shape[1])
    values, ids = xs.topk(width, dim=-1)
    z = values / params.temperature
    # Top-p without top-k is over the whole row: it needs the whole row's mass.
    whole, picked = group.subset("norm")
    row_total = None
    if whole:
        rows = select(xs, None if len(whole) == len(xs) else picked)
        row_total = (picked, total_masses(rows, params.temperature[picked], z[picked, :1]))
    uses = (bool(group.subset("top_p")[0]), bool(group.subset("min_p")[0]))
    z, exact = filter_prefix(z, params, row_total, uses)
    return ids, torch.softmax(z, -1), exact | (width == x.shape[1])


def filter_prefix(
    z: torch.Tensor,
    params: RowParams,
    row_total: tuple[torch.Tensor, torch.Tensor] | None,
    uses: tuple[bool, bool] = (True, True),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, top-p and min-p over rows' top-K temperature-scaled logits, sorted descending.

    ``row_total``: (positions, whole-row masses) of the rows whose top-p needs the whole
    row's mass (no top-k); ``uses``: whether any row has top-p, min-p (known on the host:
    a filter no row uses is skipped). Returns z with filtered-out entries at -inf, and whether the
    kept set is provably inside the prefix: for top-k when the k-th value beats the
    prefix's last; without top-k when the prefix's last entry is dropped, since every
    token past it is no likelier (and, tied with it, has the same mass above it).
    """
    k, top_p, min_p = params.top_k, params.top_p, params.min_p
    last = z[:, -1]
    z, kth = top_k(z, k)
    exact_k = last < kth.squeeze(1)

    row_max = z[:, :1]  # no filter drops the largest
    if uses[0]:
        w = weights(z, row_max)
        mass = masses(w)
        total = mass.sum(-1)
        if row_total is not None:
            total = total.index_copy(0, *row_total)
        z = z.masked_fill(outside_top_p(w, mass, total, top_p), NEG_INF)
    if uses[1]:
        z = z.masked_fill(below_min_p(z, min_p, row_max), NEG_INF)
    return z, torch.where(k > 0, exact_k, z[:, -1] == NEG_INF)


# -- the whole-row path --------------------------------------------------------------------


def whole_row_probs(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Probabilities [R, V] after the filters over whole rows: top-p by its radix select.

    For rows without a filter, rows the prefix could not decide, and (on an accelerator)
    every sampled row. Each filter runs on the rows that use it only.
    """
    params = group.params
    z = select(x, group.index) / params.temperature
    some_k, picked = group.subset("top_k")
    if some_k:
        _rows_update(
            z, some_k, picked, lambda zs, j: top_k(zs, params.top_k[j], group.largest_k)[0]
        )
    some_p, picked = group.subset("top_p")
    if some_p:
        _rows_update(z, some_p, picked, lambda zs, j: top_p_threshold(zs, params.top_p[j]))
    some_min_p, picked = group.subset("min_p")
    if some_min_p:
        _rows_update(
            z,
            some_min_p,
            picked,
            lambda zs, j: zs.masked_fill(below_min_p(zs, params.min_p[j]), NEG_INF),
        )
    return torch.softmax(z, -1)


RowsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _rows_update(z: torch.Tensor, rows: list[int], picked: torch.Tensor, fn: RowsFn) -> None:
    """z[picked] = fn(z[picked], picked), in place (``rows``: picked on the host)."""
    if len(rows) == len(z):  # every row: no gather and scatter back
        out = fn(z, picked)
        if out is not z:
            z.copy_(out)
        return
    z.index_copy_(0, picked, fn(z.index_select(0, picked), picked))


# -- both paths together -------------------------------------------------------------------


@dataclass
class Candidates:
    """The sampled rows' filtered distributions: prefix rows over their top-K ids, whole rows
    over the vocabulary. Each row's probabilities are zero outside its kept set."""

    prefix: Group | None
    ids: torch.Tensor | None  # [P, K] token ids
    prefix_probs: torch.Tensor | None  # [P, K]
    whole: Group | None
    whole_probs: torch.Tensor | None  # [W, V]

    @property
    def prefix_rows(self) -> list[int]:
        return [] if self.prefix is None else self.prefix.rows

    @property
    def whole_rows(self) -> list[int]:
        return [] if self.whole is None else self.whole.rows


def candidates(x: torch.Tensor, step: Step, unusable: torch.Tensor) -> Candidates:
    """Filter the step's sampled rows over their prefix where that is exact, over the whole
    row otherwise. Only a step planned with ``branch`` (the CPU) has prefix rows."""
    prefix, whole = step.prefix, step.whole
    ids = probs = None
    if prefix is not None:
        ids, probs, exact = prefix_candidates(x, prefix)
        decided = (exact | select(unusable, prefix.index)).tolist()  # a host read on the CPU
        fallback = [i for i, ok in zip(prefix.rows, decided, strict=True) if not ok]
        if fallback:
            keep = [j for j, ok in enumerate(decided) if ok]
            whole = step.late_group(sorted((whole.rows if whole else []) + fallback))
            prefix = step.late_group([prefix.rows[j] for j in keep])
            picked = torch.tensor(keep, dtype=torch.long)  # the CPU only (late_group checks)
            ids, probs = ids[picked], probs[picked]
    whole_probs = whole_row_probs(x, whole) if whole is not None else None
    return Candidates(prefix, ids, probs, whole, whole_probs)
