"""A step's rows, planned on the host from the requests alone and uploaded in one copy.

Which rows are greedy, which are filtered over a prefix or over the whole row, which
asked for logprobs, which are penalised (and the ids they have seen), which stop ids
are held back, each row's parameters and its draw slots: all of it is known on the
host before the logits are read. ``Step`` plans it, packs it (packed.py) and uploads
it once; the filters, the penalties, the draw and the logprobs then index with views
of that one device copy, and nothing else goes up.

One choice depends on the logits: whether a row's kept set fits in its top
``PREFILTER`` logits (filters.py). Reading that back mid-step would be a second
transfer, so on an accelerator every sampled row is filtered over its whole row
(top-p by a radix select, a few batched passes) and nothing comes back before the end.
On the CPU, where "reading back" is reading host memory, the prefix path and its
per-row fallback are kept: the whole-row filter costs several times the prefix there.

With dstp's CPU kernels built (``fused_ops``), the CPU takes neither: every sampled row is
filtered over its whole row and drawn by one call (csrc/sampler_ops.cpp's ``sample_rows``:
the same cut rules, a k-heap and a radix select per row, no sort), the penalties and stop
ids are one edit (``penalty_edit``), so nothing is read back before the end here either.

Every path draws by the same counter keys, planned here and sent in the upload (a seeded
row's from state.py's ``draw_keys``, the others' from one random word per step): the draw
hashes a key with block and token indices (draw.py), so a seeded row draws the same tokens
on the CPU's kernels, the plain ops and a GPU, and no generator is kept or reseeded per row.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from types import ModuleType

import torch

from dstp.engine.sampling.packed import Packer
from dstp.engine.sampling.state import SampleState, output_pool, position_key
from dstp.engine.sampling_params import SamplingParams

PREFILTER = 1024  # the largest logits per row that top-k / top-p / min-p start from
HOST_BRANCH = True  # False runs an accelerator's path on the CPU too (tests)


def host_branch(device: torch.device) -> bool:
    """Whether the filters may read back, mid-step, which rows the prefix could not decide."""
    return HOST_BRANCH and device.type == "cpu"


def fused_ops(device: torch.device) -> ModuleType | None:
    """dstp's fused CPU sampler ops (csrc/sampler_ops.cpp) where a step may use them: on the
    CPU's path with the kernels built; None elsewhere (plain PyTorch, as a GPU runs it)."""
    if not host_branch(device):
        return None
    from dstp.cpu import kernels

    return kernels.sampler_ops()


def top_k_of(p: SamplingParams, vocab: int) -> int:
    """The row's k, 0 when off: top_k >= vocab keeps everything."""
    return p.top_k if 0 < p.top_k < vocab else 0


def prefilters(p: SamplingParams, vocab: int) -> bool:
    """Whether the row's kept set can be found in its top PREFILTER logits (when they hold it)."""
    k = top_k_of(p, vocab)
    if k > PREFILTER:
        return False
    return k > 0 or p.top_p < 1.0 or p.min_p > 0.0


def penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)


@dataclass
class RowParams:
    """Per-row sampling parameters of some batch rows, as column tensors on the device."""

    temperature: torch.Tensor  # [R, 1]
    top_k: torch.Tensor  # [R], 0: off
    top_p: torch.Tensor  # [R]
    min_p: torch.Tensor  # [R]

    def subset(self, index: torch.Tensor | None) -> RowParams:
        if index is None:
            return self
        return RowParams(*(column.index_select(0, index) for column in vars(self).values()))


@dataclass
class Group:
    """Some of a step's rows, with the device indices that filtering and drawing them use."""

    rows: list[int]  # batch rows, ascending
    index: torch.Tensor | None  # [G] the rows; None when they are the whole batch in order
    slots: torch.Tensor  # [S] the rows' draw slots (row i has draws[i] consecutive slots)
    row_of_slot: torch.Tensor  # [S] each slot's position in ``rows``
    keys: torch.Tensor  # [S] each slot's counter key (draw.py's keyed race)
    params: RowParams
    subsets: dict[str, tuple[list[int], torch.Tensor]]  # filter -> positions in rows
    largest_k: int  # the rows' largest top_k (0: none)

    def subset(self, name: str) -> tuple[list[int], torch.Tensor]:
        return self.subsets[name]


@dataclass
class Fused:
    """The sampled rows' inputs to the fused CPU draw (``sample_rows``), on the device."""

    rows: torch.Tensor  # [G] batch rows
    starts: torch.Tensor  # [G + 1] row j's draws are slots[starts[j] : starts[j + 1]]
    slots: torch.Tensor  # [S] draw slots
    keys: torch.Tensor  # [S] each draw's counter key (state.py's draw_keys)


@dataclass
class FusedPenalties:
    """The penalised rows' inputs to the fused CPU edit (``penalty_edit``)."""

    prompts: list[torch.Tensor]  # each row's distinct prompt ids
    rows: torch.Tensor  # [P] batch rows
    pool: torch.Tensor  # the output pool's ids
    output_start: torch.Tensor  # [P]
    output_sizes: torch.Tensor  # [P]
    repetition: torch.Tensor  # [R] per batch row
    frequency: torch.Tensor  # [R]
    presence: torch.Tensor  # [R]


@dataclass
class Penalties:
    """The penalised rows' seen ids on the device: flat positions in the [R, V] logits."""

    prompts: list[torch.Tensor]  # each row's distinct prompt ids (kept on the device)
    prompt_sizes: torch.Tensor  # [P]
    prompt_base: torch.Tensor  # [P] row * vocab
    prompt_total: int
    output: torch.Tensor  # [N] row * vocab + id of every output id (repeats included)
    repetition: torch.Tensor  # [R] per batch row
    frequency: torch.Tensor  # [R]
    presence: torch.Tensor  # [R]


_SUBSETS = {  # filter -> whether a row uses it (on the whole-row path; "norm" on the prefix's)
    "top_k": lambda p, vocab: top_k_of(p, vocab) > 0,
    "top_p": lambda p, vocab: p.top_p < 1.0,
    "min_p": lambda p, vocab: p.min_p > 0.0,
    "norm": lambda p, vocab: top_k_of(p, vocab) == 0 and p.top_p < 1.0,
}


class Step:
    """One sampler step's plan: host lists, and their views on the device after one upload."""

    def __init__(
        self,
        states: list[SampleState],
        draws: list[int] | None,
        vocab: int,
        device: torch.device,
        allowed: torch.Tensor | None = None,
        branch: bool | None = None,
        fused: bool = False,
    ) -> None:
        """``fused``: use dstp's fused CPU ops where this device may (``fused_ops``)."""
        self.states, self.vocab, self.device = states, vocab, device
        self.ops = fused_ops(device) if fused else None
        self.draws = list(draws) if draws else [1] * len(states)
        self.starts = [0, *itertools.accumulate(self.draws)]
        self.branch = host_branch(device) if branch is None else branch
        params = [state.params for state in states]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        fused_rows = sampled if self.ops is not None else []
        if self.ops is not None:
            prefix, whole = [], []
        elif self.branch:
            prefix = [i for i in sampled if prefilters(params[i], vocab)]
            whole = [i for i in sampled if not prefilters(params[i], vocab)]
        else:
            prefix, whole = [], sampled
        asking = [i for i, p in enumerate(params) if p.logprobs is not None]
        self.keys = self._draw_keys(sampled)

        pack = Packer()
        pack.floats32("temperature", [p.temperature for p in params])
        pack.ints("top_k", [top_k_of(p, vocab) for p in params])
        pack.floats32("top_p", [p.top_p for p in params])
        pack.floats32("min_p", [p.min_p for p in params])
        if fused_rows:
            self._plan_fused(pack, fused_rows)
        pack.ints("slot_rows", [i for i, n in enumerate(self.draws) for _ in range(n)])
        groups = {"prefix": prefix, "whole": whole, "logprobs": asking}
        for name, rows in groups.items():
            for key, values in self._group_lists(rows).items() if rows else ():
                pack.ints(f"{name}.{key}", values)
        fresh = self._plan_penalties(pack, params)
        self._plan_stops(pack)
        if allowed is not None and allowed.device != device:
            pack.words("allowed", allowed)

        self.uploaded = pack.numel  # int64 words
        on_device = pack.upload(device)  # the step's one upload
        self.allowed = on_device.get("allowed", allowed)
        self.params = RowParams(
            on_device["temperature"].unsqueeze(1),
            on_device["top_k"],
            on_device["top_p"],
            on_device["min_p"],
        )
        self.fused = (
            Fused(*(on_device[f"fused.{key}"] for key in ("rows", "starts", "slots", "keys")))
            if fused_rows
            else None
        )
        self.slot_rows = on_device["slot_rows"]
        self.prefix, self.whole, self.logprobs = (
            self._group(rows, lambda key, values, name=name: on_device[f"{name}.{key}"])
            if rows
            else None
            for name, rows in groups.items()
        )
        self.stops = on_device.get("stops")
        self.penalties = self._penalties(on_device, fresh)

    # -- groups ---------------------------------------------------------------------------

    def slots_of(self, rows: list[int]) -> list[int]:
        return [s for i in rows for s in range(self.starts[i], self.starts[i + 1])]

    def _group_lists(self, rows: list[int]) -> dict[str, list[int]]:
        lists = {
            "index": rows,
            "slots": self.slots_of(rows),
            "row_of_slot": [j for j, i in enumerate(rows) for _ in range(self.draws[i])],
        }
        lists["keys"] = [self.keys[s] for s in lists["slots"]]
        for name, uses in _SUBSETS.items():
            lists[name] = [j for j, i in enumerate(rows) if uses(self.states[i].params, self.vocab)]
        return lists

    def _group(self, rows: list[int], tensor) -> Group:
        lists = self._group_lists(rows)
        index = None if rows == list(range(len(self.states))) else tensor("index", rows)
        return Group(
            rows,
            index,
            tensor("slots", lists["slots"]),
            tensor("row_of_slot", lists["row_of_slot"]),
            tensor("keys", lists["keys"]),
            self.params.subset(index),
            {name: (lists[name], tensor(name, lists[name])) for name in _SUBSETS},
            max(top_k_of(self.states[i].params, self.vocab) for i in rows),
        )

    def late_group(self, rows: list[int]) -> Group | None:
        """A group chosen after reading the logits: only where that read is free (the CPU)."""
        if not rows:
            return None
        assert self.device.type == "cpu", "a mid-step choice of rows on an accelerator"
        return self._group(rows, lambda key, values: torch.tensor(values, dtype=torch.long))

    def _draw_keys(self, sampled: list[int]) -> list[int]:
        """Each draw slot's counter key (0 for greedy rows): a seeded row's from its sequence
        (state.py), the others' from one random word per step. Every path draws by these."""
        keys = [0] * self.starts[-1]
        base = None
        for i in sampled:
            seeded = self.states[i].draw_keys(self.draws[i])
            if seeded is None:
                if base is None:  # torch's generator, on the host: torch.manual_seed repeats a run
                    base = int(torch.randint(0, 2**62, (1,)))
                seeded = [position_key(base, s) for s in range(self.starts[i], self.starts[i + 1])]
            keys[self.starts[i] : self.starts[i + 1]] = seeded
        return keys

    def _plan_fused(self, pack: Packer, rows: list[int]) -> None:
        """The fused draw's rows, their slots and each slot's counter key."""
        slots = self.slots_of(rows)
        pack.ints("fused.rows", rows)
        pack.ints("fused.starts", [0, *itertools.accumulate(self.draws[i] for i in rows)])
        pack.ints("fused.slots", slots)
        pack.ints("fused.keys", [self.keys[s] for s in slots])

    # -- penalties and stop ids -------------------------------------------------------------

    def _plan_penalties(self, pack: Packer, params: list[SamplingParams]) -> list[int]:
        """Pack the penalised rows' inputs; returns the rows whose prompt goes up this step.

        Of each row's output only the tokens its region on the device lacks go up
        (usually the one drawn last step): positions in the pool and ids, for one write.
        """
        self._penalised = [i for i, p in enumerate(params) if penalised(p)]
        if not self._penalised:
            return []
        counts = [self.states[i].token_counts() for i in self._penalised]
        if any(c.largest >= self.vocab for c in counts):
            raise IndexError(f"a prompt or output id is outside the vocabulary of {self.vocab}")
        fresh = [j for j, c in enumerate(counts) if self.device not in c.on_device]
        for j in fresh:
            pack.ints(f"prompt.{j}", counts[j].prompt)
        pack.ints("prompt_sizes", [c.prompt.numel() for c in counts])
        pack.ints("prompt_base", [i * self.vocab for i in self._penalised])
        self._pool = output_pool(self.device)
        regions = [c.region(self._pool) for c in counts]
        pack.ints("output_start", [r.start for r in regions])
        pack.ints("output_sizes", [c.counted for c in counts])
        new = [(r, c) for r, c in zip(regions, counts, strict=True) if r.written < c.counted]
        # host lists, not tensors: no torch op per row on the host
        pack.ints(
            "new_where",
            [k for r, c in new for k in range(r.start + r.written, r.start + c.counted)],
        )
        pack.ints("new_ids", [k for r, c in new for k in c.ids[r.written : c.counted]])
        pack.floats32("repetition", [p.repetition_penalty for p in params])
        pack.floats32("frequency", [p.frequency_penalty for p in params])
        pack.floats32("presence", [p.presence_penalty for p in params])
        if self.ops is not None:
            pack.ints("penalised_rows", self._penalised)
        self._counts, self._regions = counts, regions
        return fresh

    def _penalties(
        self, on_device: dict[str, torch.Tensor], fresh: list[int]
    ) -> Penalties | FusedPenalties | None:
        if not self._penalised:
            return None
        for j in fresh:  # kept on the device for the sequence's later steps
            self._counts[j].on_device[self.device] = on_device[f"prompt.{j}"]
        pool = self._pool
        pool.ids[on_device["new_where"]] = on_device["new_ids"]  # the step's new output ids
        for region, counts in zip(self._regions, self._counts, strict=True):
            region.written = counts.counted
        if self.ops is not None:  # the fused edit reads each row's output in the pool
            return FusedPenalties(
                [c.on_device[self.device] for c in self._counts],
                on_device["penalised_rows"],
                pool.ids,
                on_device["output_start"],
                on_device["output_sizes"],
                on_device["repetition"],
                on_device["frequency"],
                on_device["presence"],
            )
        sizes, base = on_device["output_sizes"], on_device["prompt_base"]
        total = sum(c.counted for c in self._counts)
        entry = torch.arange(total, device=self.device)
        ends = sizes.cumsum(0)
        owner = torch.searchsorted(ends, entry, right=True)  # each output id's row, fixed shapes
        at = on_device["output_start"][owner] + entry - (ends - sizes)[owner]
        return Penalties(
            [c.on_device[self.device] for c in self._counts],
            on_device["prompt_sizes"],
            base,
            sum(c.prompt.numel() for c in self._counts),
            pool.ids[at] + base[owner],
            on_device["repetition"],
            on_device["frequency"],
            on_device["presence"],
        )

    def _plan_stops(self, pack: Packer) -> None:
        """-inf goes at the stop ids of rows that have not reached min_tokens yet."""
        masked = [
            (i, token)
            for i, state in enumerate(self.states)
            if len(state.output_ids) < state.params.min_tokens
            for token in state.stop_ids
        ]
        if not masked:
            return
        if not all(0 <= token < self.vocab for _, token in masked):
            raise IndexError(f"a stop id is outside the vocabulary of {self.vocab}")
        pack.ints("stops", [i * self.vocab + token for i, token in masked])
