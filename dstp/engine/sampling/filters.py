"""Top-k, top-p and min-p: each rule written once, applied on two paths.

Filtering looks first at each row's ``PREFILTER`` largest logits, from one
batched ``topk`` (sorting a whole vocabulary costs ~15x more). A row whose
kept set might reach past that prefix (say a flat distribution whose prefix
mass is below top_p) is filtered again over its whole row, exactly as the
oracle (tests/helpers/reference_sampler.py) does. Both paths call the same
three filters; they differ only in whether the row is already sorted and in
which rows a filter runs on. Choosing the fallback rows reads a flag per row back
mid-step, so only the CPU takes the prefix path; an accelerator filters every
sampled row over its whole row (step.py says why).
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


def outside_top_p(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Over probabilities sorted descending: what lies past the smallest set reaching top_p."""
    drop = sorted_probs.cumsum(-1) - sorted_probs > top_p.unsqueeze(1)
    return drop & (top_p < 1.0).unsqueeze(1)


def top_p_unsorted(z: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """z with -inf outside each row's top-p set, for rows in vocabulary order (sorts them)."""
    ordered, order = torch.sort(z, dim=-1, descending=True)
    drop = outside_top_p(torch.softmax(ordered, dim=-1), top_p)
    return z.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), NEG_INF)


def below_min_p(z: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Where a token's probability is below min_p times its row's largest (min_p = 0: off)."""
    probs = torch.softmax(z, dim=-1)
    drop = probs < (min_p * probs.amax(-1)).unsqueeze(1)
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
    # Top-p without top-k is over the whole row: it needs the whole row's normaliser.
    whole, picked = group.subset("norm")
    row_probs = None
    if whole:
        scaled = select(xs, None if len(whole) == len(xs) else picked) / params.temperature[picked]
        row_probs = (picked, torch.softmax(scaled, -1).gather(1, ids[picked]))
    z, exact = filter_prefix(z, params, row_probs)
    return ids, torch.softmax(z, -1), exact | (width == x.shape[1])


def filter_prefix(
    z: torch.Tensor, params: RowParams, row_probs: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, top-p and min-p over rows' top-K temperature-scaled logits, sorted descending.

    Returns z with filtered-out entries at -inf, and whether the kept set is
    provably inside the prefix: for top-k when the k-th value beats the
    prefix's last; for top-p (without top-k) and min-p (alone) when the
    prefix's last entry is dropped, since every token past it is no likelier.
    """
    k, top_p, min_p = params.top_k, params.top_p, params.min_p
    last = z[:, -1]
    z, kth = top_k(z, k)
    exact_k = last < kth.squeeze(1)

    probs = torch.softmax(z, -1)
    if row_probs is not None:  # normalised over the whole row, as the oracle's
        probs = probs.index_copy(0, *row_probs)
    drop = outside_top_p(probs, top_p)
    z = z.masked_fill(drop, NEG_INF)
    exact_p = drop[:, -1]

    drop = below_min_p(z, min_p)
    z = z.masked_fill(drop, NEG_INF)
    exact_min_p = drop[:, -1]
    return z, torch.where(k > 0, exact_k, torch.where(top_p < 1.0, exact_p, exact_min_p))


# -- the whole-row path --------------------------------------------------------------------


def whole_row_probs(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Probabilities [R, V] after the oracle's filter over whole rows: exact, but top-p sorts.

    For rows without a filter, rows the prefix could not decide, and (on an accelerator)
    every sampled row. Each filter runs on the rows that use it only.
    """
    params = group.params
    z = select(x, group.index) / params.temperature
    some_k, picked = group.subset("top_k")
    if some_k:
        _rows_update(z, picked, lambda zs, j: top_k(zs, params.top_k[j], group.largest_k)[0])
    some_p, picked = group.subset("top_p")
    if some_p:
        _rows_update(z, picked, lambda zs, j: top_p_unsorted(zs, params.top_p[j]))
    some_min_p, picked = group.subset("min_p")
    if some_min_p:
        _rows_update(
            z, picked, lambda zs, j: zs.masked_fill(below_min_p(zs, params.min_p[j]), NEG_INF)
        )
    return torch.softmax(z, -1)


RowsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _rows_update(z: torch.Tensor, picked: torch.Tensor, fn: RowsFn) -> None:
    """z[picked] = fn(z[picked], picked), in place."""
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
