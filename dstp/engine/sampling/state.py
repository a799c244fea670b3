"""What the sampler keeps per sequence: its parameters, seen ids and seeded generator.

Each sequence keeps its seen ids and output counts as tensors on the logits'
device (``TokenCounts``), updated with new tokens only, so penalties cost
O(ids seen) a step instead of rebuilding a sorted set of the whole prompt and
output.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dstp.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from dstp.engine.structured.matcher import GrammarState

Generators = list[torch.Generator | None]


class TokenCounts:
    """The distinct ids a sequence has seen (prompt and output), and how often each is in its output.

    Kept as tensors on the logits' device and updated with the tokens appended
    since the last step, so penalties cost O(ids seen) a step instead of
    rebuilding a sorted set of the whole prompt and output.
    """

    def __init__(self, prompt_ids: Sequence[int], device: torch.device) -> None:
        distinct = sorted(set(prompt_ids))
        self.device = device
        self.position = {token: i for i, token in enumerate(distinct)}
        self.ids = torch.tensor(distinct, dtype=torch.long, device=device)
        self.in_output = torch.zeros(len(distinct), device=device)
        self.counted = 0  # how many output ids ``in_output`` covers
        self.largest = max(distinct, default=-1)  # checked against the vocabulary on the host

    def update(self, output_ids: Sequence[int]) -> None:
        """Count the output ids appended since the last call."""
        bumped, fresh = [], []
        for token in output_ids[self.counted :]:
            pos = self.position.get(token)
            if pos is None:
                pos = self.position[token] = len(self.position)
                fresh.append(token)
            bumped.append(pos)
        self.counted = len(output_ids)
        if fresh:
            self.largest = max(self.largest, *fresh)
            new = torch.tensor(fresh, dtype=torch.long, device=self.device)
            self.ids = torch.cat([self.ids, new])
            self.in_output = torch.cat([self.in_output, self.in_output.new_zeros(len(fresh))])
        if bumped:
            where = torch.tensor(bumped, dtype=torch.long, device=self.device)
            self.in_output.index_add_(0, where, self.in_output.new_ones(len(bumped)))


@dataclass
class SampleState:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]  # the engine assigns the live list before each step
    generator: torch.Generator | None  # only seeded requests have one
    stop_ids: frozenset[int] = field(default_factory=frozenset)  # EOS + stop_token_ids
    grammar: GrammarState | None = None  # structured outputs: the sequence's matcher
    _counts: TokenCounts | None = field(default=None, init=False, repr=False, compare=False)
    _device_generator: torch.Generator | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def token_counts(self, device: torch.device) -> TokenCounts:
        """This sequence's counts on ``device``, built on first use, then brought up to date."""
        counts = self._counts
        if counts is None or counts.device != device or counts.counted > len(self.output_ids):
            counts = self._counts = TokenCounts(self.prompt_ids, device)
        counts.update(self.output_ids)
        return counts

    def generator_on(self, device: torch.device) -> torch.Generator | None:
        """The seeded generator, or a twin seeded alike on ``device`` when the logits live there."""
        gen = self.generator
        if gen is None or gen.device == device:
            return gen
        twin = self._device_generator
        if twin is None or twin.device != device:
            twin = self._device_generator = torch.Generator(device).manual_seed(gen.initial_seed())
        return twin


def make_generator(seed: int | None, index: int) -> torch.Generator | None:
    """Sample ``index``'s own generator when the request has a seed, so its draws repeat on any
    TP size and batch; None without a seed (unseeded rows share one batched draw)."""
    if seed is None:
        return None
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + index) % 2**63)
    return gen


class DrawSlots:
    """A batch's draw slots, one per token to draw: row i's ``draws[i]`` slots are consecutive."""

    def __init__(self, states: list[SampleState], draws: list[int], device: torch.device) -> None:
        self.states, self.draws, self.device = states, draws, device
        self.starts = [0, *itertools.accumulate(draws)]

    def of(self, rows: list[int]) -> list[int]:
        return [s for i in rows for s in range(self.starts[i], self.starts[i + 1])]

    def row_of_slot(self, rows: list[int]) -> torch.Tensor:
        """For each slot of ``rows``, its position in ``rows``."""
        index = [j for j, i in enumerate(rows) for _ in range(self.draws[i])]
        return torch.tensor(index, dtype=torch.long, device=self.device)

    def generators(self, rows: list[int]) -> Generators:
        return [
            self.states[i].generator_on(self.device) for i in rows for _ in range(self.draws[i])
        ]
