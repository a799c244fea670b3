"""The test oracle: dstp's first sampler, per row on the CPU, kept verbatim but for its cut rules.

Top-p and min-p follow the rules stated in dstp/engine/sampling/filters.py, computed here
the plain way (classes of equal weight from ``unique``, their masses summed per class):
top-p keeps the tokens with at most floor(top_p * total) integer mass strictly above their
weight, so tokens tied at the cut are kept or dropped together (the first sampler's
``cumsum - p > top_p`` over a sorted row split them by the sort's order, and its float32
cumsum rounded differently from any unsorted method); min-p drops weights
exp(z - max z) below min_p. Everything else is the first sampler's.

dstp/engine/sampling/ replaced it with a sampler batched over rows on the logits'
device; tests/engine/test_sampler.py checks the new one against this one (exactly for
greedy rows, filters and logprobs, in distribution for sampled rows). It
accepts dstp.engine.sampling.SampleState too: it reads only the fields both share.

Original docstring: turn gathered logits into tokens, on rank 0 only (so every
rank agrees).

Order, as in vLLM and HF: suppress stop tokens before ``min_tokens``, apply
repetition / presence / frequency penalties, then temperature, top-k, top-p,
min-p, and draw with the sequence's own seeded generator. Logprobs describe
the model's raw distribution (before penalties and temperature).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dstp.engine.outputs import TokenLogprob
from dstp.engine.sampling_params import SamplingParams

MASS_BITS = 30  # filters.py's unit of top-p mass, 2**-30 (tests check the two agree)


@dataclass
class SampleState:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    stop_ids: frozenset[int] = field(default_factory=frozenset)  # EOS + stop_token_ids


def make_generator(seed: int | None, index: int) -> torch.Generator:
    """Per-sample generator: a fixed seed gives the same draws on any TP size."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed((seed * 1_000_003 + index) % 2**63)
    return gen


# -- dstp's keyed draw (csrc/sampler_ops.cpp, and draw.py's plain ops), stated per element --
#
# A seeded draw is keyed by (seed, choice, output position, draw j): no generator state, so a
# replayed sequence draws again what it drew. Noise number i of a draw keyed k is
# E = -log(u), u = (top 53 bits of splitmix64(k + (i + 1) * golden) + 1/2) / 2**53. The
# race: argmax over blocks of 256 tokens of (the block's probability) / E(block), then
# argmax over that block's tokens of p / E(2**32 + token): the first one on ties.

_GOLDEN = 0x9E3779B97F4A7C15
_BLOCK = 256
_INSIDE = 2**32


def _splitmix64(z: int) -> int:
    z %= 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def choice_key(seed: int, index: int) -> int:
    """The key of a request's choice ``index`` (what make_generator seeds with)."""
    return (seed * 1_000_003 + index) % 2**63


def draw_key(choice: int, position: int, j: int) -> int:
    """The key of draw ``j`` at output ``position`` of a choice keyed ``choice``."""
    at = _splitmix64(choice + (position + 1) * _GOLDEN) % 2**63
    return _splitmix64(at + (j + 1) * _GOLDEN) % 2**63


def _exp_noise(key: int, index: int) -> float:
    bits = _splitmix64(key + (index + 1) * _GOLDEN) >> 11
    return -math.log((bits + 0.5) * 2.0**-53)


def keyed_draw(probs: torch.Tensor, key: int) -> int:
    """The token a draw keyed ``key`` takes from the filtered distribution ``probs``."""
    p = probs.tolist()
    best, block = -1.0, 0
    for b in range(0, len(p), _BLOCK):
        score = math.fsum(p[b : b + _BLOCK]) / _exp_noise(key, b // _BLOCK)
        if score > best:
            best, block = score, b
    best, token = -1.0, block
    for v in range(block, min(len(p), block + _BLOCK)):
        if p[v] > 0 and p[v] / _exp_noise(key, _INSIDE + v) > best:
            best, token = p[v] / _exp_noise(key, _INSIDE + v), v
    return token


def _penalise(row: torch.Tensor, state: SampleState) -> torch.Tensor:
    p = state.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(state.prompt_ids) | set(state.output_ids)), dtype=torch.long)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and state.output_ids:
        ids, counts = torch.tensor(state.output_ids).unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty
    return row


def _filter(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with everything outside top-k / top-p / min-p at -inf."""
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        weight = torch.exp(row - row.max())
        mass = (weight * 2.0**MASS_BITS).long()
        top_p = float(torch.tensor(p.top_p, dtype=torch.float32))
        budget = int(top_p * float(mass.sum()))
        classes, which = torch.unique(weight, return_inverse=True)  # ascending weights
        class_mass = torch.zeros(len(classes), dtype=torch.long).index_add_(0, which, mass)
        above = class_mass.sum() - class_mass.cumsum(0)  # mass of strictly larger weights
        row = row.masked_fill(above[which] > budget, float("-inf"))
    if p.min_p > 0.0:
        weight = torch.exp(row - row.max())
        row = row.masked_fill(weight < torch.tensor(p.min_p, dtype=torch.float32), float("-inf"))
    return row


class SamplingError(RuntimeError):
    """One row cannot be sampled; it fails its own request only."""


Picks = list[tuple[int, TokenLogprob | None]]


def sample(
    logits: torch.Tensor, states: list[SampleState], draws: list[int] | None = None
) -> list[Picks | Exception]:
    """Sample ``draws[i]`` tokens (default 1) for each row; returns per-row [(token, logprob)].

    A row that fails (non-finite logits, every token masked, any error while
    sampling it) gives its exception in place of its picks: the failure belongs
    to that row's request, and the other rows are still sampled.
    """
    logits = logits.float()
    raw_logprobs = (
        torch.log_softmax(logits, dim=-1)
        if any(s.params.logprobs is not None for s in states)
        else None
    )
    broken = (logits.isnan() | logits.isposinf()).any(dim=-1).tolist()
    results: list[Picks | Exception] = []
    for i, state in enumerate(states):
        try:
            if broken[i]:
                raise SamplingError("the model produced non-finite logits (NaN or +inf)")
            results.append(_sample_row(logits[i], raw_logprobs, i, state, draws[i] if draws else 1))
        except Exception as exc:  # isolated to this row's request
            results.append(exc)
    return results


def _sample_row(
    logits: torch.Tensor, raw_logprobs: torch.Tensor | None, i: int, state: SampleState, draws: int
) -> Picks:
    p = state.params
    row = logits.clone()
    if len(state.output_ids) < p.min_tokens and state.stop_ids:
        row[list(state.stop_ids)] = float("-inf")
    row = _penalise(row, state)
    if not bool(row.max() > float("-inf")):
        raise SamplingError("every token is masked (stop_token_ids before min_tokens?)")
    picks = []
    for _ in range(draws):
        if p.greedy:
            token = int(row.argmax())
        else:
            probs = torch.softmax(_filter(row, p), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=state.generator))
        picks.append((token, _logprob(raw_logprobs, i, token, p.logprobs)))
    return picks


def _logprob(raw: torch.Tensor | None, row: int, token: int, k: int | None) -> TokenLogprob | None:
    if raw is None or k is None:
        return None
    top = {}
    if k > 0:
        values, ids = torch.topk(raw[row], k)
        top = {int(t): float(v) for t, v in zip(ids, values, strict=True)}
    return TokenLogprob(token, float(raw[row, token]), top)
