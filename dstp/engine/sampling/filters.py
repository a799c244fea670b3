"""Top-k, top-p and min-p: each rule written once, applied on two paths.

Filtering looks first at each row's ``PREFILTER`` largest logits, from one
batched ``topk`` (sorting a whole vocabulary costs ~15x more). A row whose
kept set might reach past that prefix (say a flat distribution whose prefix
mass is below top_p) is filtered again over its whole row, exactly as the
oracle (tests/helpers/reference_sampler.py) does. Both paths call the same
three filters; they differ only in whether the row is already sorted and in
which rows a filter runs on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dstp.engine.sampling.state import SampleState
from dstp.engine.sampling_params import SamplingParams

PREFILTER = 1024  # the largest logits per row that top-k / top-p / min-p start from
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


# -- per-row parameters --------------------------------------------------------------------


@dataclass
class RowParams:
    """Per-row sampling parameters of some batch rows, as column tensors on the device."""

    temperature: torch.Tensor  # [R, 1]
    top_k: torch.Tensor  # [R], 0: off
    top_p: torch.Tensor  # [R]
    min_p: torch.Tensor  # [R]

    @classmethod
    def of(cls, rows: list[int], states: list[SampleState], x: torch.Tensor) -> RowParams:
        params = [states[i].params for i in rows]
        vocab = x.shape[1]

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=x.device)

        return cls(
            column([p.temperature for p in params]).unsqueeze(1),
            column([top_k_of(p, vocab) for p in params], torch.long),
            column([p.top_p for p in params]),
            column([p.min_p for p in params]),
        )


def top_k_of(p: SamplingParams, vocab: int) -> int:
    """The row's k, 0 when off: top_k >= vocab keeps everything."""
    return p.top_k if 0 < p.top_k < vocab else 0


def select(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x's ``rows``, without a copy when they are all of them in order."""
    if rows == list(range(len(x))):
        return x
    return x.index_select(0, torch.tensor(rows, dtype=torch.long, device=x.device))


def prefilters(p: SamplingParams, vocab: int) -> bool:
    """Whether the row's kept set can be found in its top PREFILTER logits (when they hold it)."""
    k = top_k_of(p, vocab)
    if k > PREFILTER:
        return False
    return k > 0 or p.top_p < 1.0 or p.min_p > 0.0


# -- the prefix path -----------------------------------------------------------------------


def prefix_candidates(
    x: torch.Tensor, rows: list[int], states: list[SampleState]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids [R, K], probabilities [R, K], exact [R]) over each row's top K logits.

    ``exact`` says that the row's kept set provably lies inside the prefix, so
    these probabilities are the oracle's; rows without it need the whole row.
    """
    xs, params = select(x, rows), RowParams.of(rows, states, x)
    width = min(PREFILTER, x.shape[1])
    values, ids = xs.topk(width, dim=-1)
    z = values / params.temperature
    # Top-p without top-k is over the whole row: it needs the whole row's normaliser.
    whole = [j for j, i in enumerate(rows) if top_k_of(states[i].params, x.shape[1]) == 0]
    whole = [j for j in whole if states[rows[j]].params.top_p < 1.0]
    row_probs = None
    if whole:
        picked = torch.tensor(whole, dtype=torch.long, device=x.device)
        scaled = select(xs, whole) / params.temperature[picked]
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


def whole_row_probs(x: torch.Tensor, rows: list[int], states: list[SampleState]) -> torch.Tensor:
    """Probabilities [R, V] after the oracle's filter over whole rows: exact, but top-p sorts.

    For rows without a filter, and rows the prefix could not decide. Each filter
    runs on the rows that use it only.
    """
    params = RowParams.of(rows, states, x)
    z = select(x, rows) / params.temperature
    top_ks = [top_k_of(states[i].params, x.shape[1]) for i in rows]
    some_k = [j for j, k in enumerate(top_ks) if k > 0]
    if some_k:
        largest = max(top_ks)
        _rows_update(z, some_k, lambda zs, j: top_k(zs, params.top_k[j], largest)[0])
    some_p = [j for j, i in enumerate(rows) if states[i].params.top_p < 1.0]
    if some_p:
        _rows_update(z, some_p, lambda zs, j: top_p_unsorted(zs, params.top_p[j]))
    some_min_p = [j for j, i in enumerate(rows) if states[i].params.min_p > 0.0]
    if some_min_p:
        _rows_update(
            z, some_min_p, lambda zs, j: zs.masked_fill(below_min_p(zs, params.min_p[j]), NEG_INF)
        )
    return torch.softmax(z, -1)


RowsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _rows_update(z: torch.Tensor, rows: list[int], fn: RowsFn) -> None:
    """z[rows] = fn(z[rows], rows as a tensor), in place."""
    picked = torch.tensor(rows, dtype=torch.long, device=z.device)
    z.index_copy_(0, picked, fn(z.index_select(0, picked), picked))


# -- both paths together -------------------------------------------------------------------


@dataclass
class Candidates:
    """The sampled rows' filtered distributions: prefix rows over their top-K ids, whole rows
    over the vocabulary. Each row's probabilities are zero outside its kept set."""

    prefix_rows: list[int]
    ids: torch.Tensor | None  # [P, K] token ids
    prefix_probs: torch.Tensor | None  # [P, K]
    whole_rows: list[int]
    whole_probs: torch.Tensor | None  # [W, V]


def candidates(
    x: torch.Tensor, rows: list[int], states: list[SampleState], unusable: torch.Tensor
) -> Candidates:
    """Filter ``rows`` over their prefix where that is exact, over the whole row otherwise."""
    vocab = x.shape[1]
    prefix = [i for i in rows if prefilters(states[i].params, vocab)]
    whole = [i for i in rows if not prefilters(states[i].params, vocab)]
    ids = probs = None
    if prefix:
        ids, probs, exact = prefix_candidates(x, prefix, states)
        decided = exact | unusable[torch.tensor(prefix, dtype=torch.long, device=x.device)]
        decided = decided.tolist()  # the one sync before the end: which rows fall back
        whole = sorted(whole + [i for i, ok in zip(prefix, decided, strict=True) if not ok])
        keep = [j for j, ok in enumerate(decided) if ok]
        if len(keep) < len(prefix):
            picked = torch.tensor(keep, dtype=torch.long, device=x.device)
            ids, probs = ids[picked], probs[picked]
            prefix = [prefix[j] for j in keep]
    whole_probs = whole_row_probs(x, whole, states) if whole else None
    return Candidates(prefix, ids, probs, whole, whole_probs)
