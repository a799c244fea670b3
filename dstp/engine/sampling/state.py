"""What the sampler keeps per sequence: its parameters, seen ids and seeded generator.

Each sequence keeps its distinct prompt ids on the logits' device (uploaded once, in
a step's packed upload) and its output ids on the host, extended with new tokens
only (``TokenCounts``), so penalties cost O(ids seen) a step and no per-row upload.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dstp.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from dstp.engine.structured.matcher import GrammarState

Generators = list[torch.Generator | None]


class TokenCounts:
    """The ids a sequence has seen, for its penalties: its distinct prompt ids and its output.

    The distinct prompt ids go to the device once, inside the step's packed upload, and
    stay there (``on_device``); the output is kept as a host tensor extended with the
    tokens appended since the last step, and each step's output ids travel in the step's
    packed upload, where they are counted on the device.
    """

    def __init__(self, prompt_ids: Sequence[int]) -> None:
        distinct = sorted(set(prompt_ids))
        self.prompt = torch.tensor(distinct, dtype=torch.long)  # host
        self.on_device: dict[torch.device, torch.Tensor] = {}  # the prompt ids, per device
        self._output = torch.empty(0, dtype=torch.long)  # host, with room to grow
        self.counted = 0  # how many output ids ``_output`` holds
        self.largest = max(distinct, default=-1)  # checked against the vocabulary on the host

    @property
    def output(self) -> torch.Tensor:
        """The output ids so far, on the host."""
        return self._output[: self.counted]

    def update(self, output_ids: Sequence[int]) -> None:
        """Take in the output ids appended since the last call."""
        fresh = output_ids[self.counted :]
        if not fresh:
            return
        total = self.counted + len(fresh)
        if total > self._output.numel():
            grown = torch.empty(max(total, 2 * self._output.numel()), dtype=torch.long)
            grown[: self.counted] = self.output
            self._output = grown
        self._output[self.counted : total] = torch.tensor(list(fresh), dtype=torch.long)
        self.counted = total
        self.largest = max(self.largest, *fresh)


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

    def token_counts(self) -> TokenCounts:
        """This sequence's seen ids, built on first use, then brought up to date."""
        counts = self._counts
        if counts is None or counts.counted > len(self.output_ids):
            counts = self._counts = TokenCounts(self.prompt_ids)
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
