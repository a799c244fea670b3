"""What the sampler keeps per sequence: its parameters, seen ids and draw keys.

Each sequence keeps its distinct prompt ids on the logits' device (uploaded once, in
a step's packed upload) and its output ids on the host and in a pool on the device,
both extended with new tokens only (``TokenCounts``), so penalties cost O(ids seen) a
step and no per-row upload.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dstp.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from dstp.engine.structured.matcher import GrammarState


class OutputPool:
    """The output ids of every penalised sequence on one device: one tensor, a region each.

    A step writes only its new tokens into it (one indexed write from the step's packed
    upload); the penalties gather each row's output from its region. Regions come from a
    bump allocator with a free list, and go back to it when their sequence's counts die.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ids = torch.zeros(0, dtype=torch.long, device=device)
        self._free: list[tuple[int, int]] = []  # (start, size) of released regions
        self._top = 0
        self._lock = threading.RLock()  # a region may be released by the GC on any thread

    def allocate(self, size: int) -> int:
        with self._lock:
            for k, (start, have) in enumerate(self._free):
                if have >= size:
                    if have > size:
                        self._free[k] = (start + size, have - size)
                    else:
                        del self._free[k]
                    return start
            start, self._top = self._top, self._top + size
            if self._top > self.ids.numel():  # grow: a copy on the device, nothing uploaded
                grown = torch.zeros(
                    max(self._top, 2 * self.ids.numel()), dtype=torch.long, device=self.device
                )
                grown[:start] = self.ids[:start]
                self.ids = grown
            return start

    def release(self, start: int, size: int) -> None:
        with self._lock:
            self._free.append((start, size))


_LOCAL = threading.local()  # each thread its own pools: a step never sees another's growth


def output_pool(device: torch.device) -> OutputPool:
    pools = getattr(_LOCAL, "pools", None)
    if pools is None:
        pools = _LOCAL.pools = {}
    pool = pools.get(device)
    if pool is None:
        pool = pools[device] = OutputPool(device)
    return pool


@dataclass
class Region:
    """Where a sequence's output ids live in a device's pool, and how many are written."""

    start: int
    size: int
    written: int
    release: weakref.finalize


class TokenCounts:
    """The ids a sequence has seen, for its penalties: its distinct prompt ids and its output.

    The distinct prompt ids go to the device once, inside a step's packed upload, and stay
    there (``on_device``). The output is kept on the host as a list (extended with the
    tokens appended since the last step: no torch op per step) and in the device's ``OutputPool``, where each step
    writes only the tokens that are new to it, from the step's packed upload.
    """

    def __init__(self, prompt_ids: Sequence[int], max_tokens: int = 16) -> None:
        distinct = sorted(set(prompt_ids))
        self.prompt = torch.tensor(distinct, dtype=torch.long)  # host
        self.on_device: dict[torch.device, torch.Tensor] = {}  # the prompt ids, per device
        self.regions: dict[OutputPool, Region] = {}  # the output ids, per pool
        self.ids: list[int] = []  # the output ids so far, on the host (a list: no torch op)
        self.largest = max(distinct, default=-1)  # checked against the vocabulary on the host
        self._first_size = max(16, min(max_tokens, 1024))

    @property
    def counted(self) -> int:
        """How many output ids are taken in."""
        return len(self.ids)

    @property
    def output(self) -> torch.Tensor:
        """The output ids so far, as a host tensor."""
        return torch.tensor(self.ids, dtype=torch.long)

    def update(self, output_ids: Sequence[int]) -> None:
        """Take in the output ids appended since the last call."""
        fresh = output_ids[self.counted :]
        if not fresh:
            return
        self.ids.extend(fresh)
        self.largest = max(self.largest, *fresh)

    def region(self, pool: OutputPool) -> Region:
        """This sequence's region in ``pool``, with room for its whole output so far."""
        region = self.regions.get(pool)
        if region is not None and region.size >= self.counted:
            return region
        size = max(self._first_size, self.counted, 2 * region.size if region else 0)
        start = pool.allocate(size)
        written = 0
        if region is not None:  # moved: a copy on the device
            written = region.written
            pool.ids[start : start + written] = pool.ids[region.start : region.start + written]
            region.release()
        release = weakref.finalize(self, pool.release, start, size)
        region = self.regions[pool] = Region(start, size, written, release)
        return region


@dataclass
class SampleState:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]  # the engine assigns the live list before each step
    generator: torch.Generator | None  # only seeded requests have one: its seed keys the draws
    stop_ids: frozenset[int] = field(default_factory=frozenset)  # EOS + stop_token_ids
    grammar: GrammarState | None = None  # structured outputs: the sequence's matcher
    _counts: TokenCounts | None = field(default=None, init=False, repr=False, compare=False)
    _key: int | None = field(default=None, init=False, repr=False, compare=False)

    def token_counts(self) -> TokenCounts:
        """This sequence's seen ids, built on first use, then brought up to date."""
        counts = self._counts
        if counts is None or counts.counted > len(self.output_ids):
            counts = self._counts = TokenCounts(self.prompt_ids, self.params.max_tokens)
        counts.update(self.output_ids)
        return counts

    def draw_keys(self, draws: int) -> list[int] | None:
        """The counter keys of this sequence's next ``draws`` draws (None when unseeded).

        Draw j at output position ``len(output_ids)`` is keyed (seed, choice, position, j),
        so a replayed or recomputed sequence draws what it drew before; every path's draw
        (draw.py, csrc/sampler_ops.cpp) hashes a key with block and token indices, no
        generator state.
        """
        if self.generator is None:
            return None
        if self._key is None:
            self._key = self.generator.initial_seed()
        at = position_key(self._key, len(self.output_ids))
        return [position_key(at, j) for j in range(draws)]


def position_key(key: int, position: int) -> int:
    """A seed for output ``position`` of the choice seeded ``key`` (splitmix64's mixer)."""
    z = (key + (position + 1) * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


def make_generator(seed: int | None, index: int) -> torch.Generator | None:
    """Choice ``index``'s own generator when the request has a seed, so its draws repeat on any
    TP size and batch and after a replay (only its seed is used: :meth:`SampleState.draw_keys`
    keys each draw by position); None without a seed (unseeded rows key off one random word
    per step)."""
    if seed is None:
        return None
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + index) % 2**63)
    return gen
