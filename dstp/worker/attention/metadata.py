"""What one step's attention needs to know, built once per step from the host plan.

Every Python int here (offsets, lengths, which sequences decode) comes from
the plan's host arrays, never from a device tensor, and every index a layer
uses is a device tensor built once per step: a layer's attention never waits
for the host (on a GPU, a list index or ``.item()`` per layer would be a sync).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dstp.worker.kv_cache import PagedKVCache

if TYPE_CHECKING:
    from dstp.worker.attention.backends import AttentionBackend
    from dstp.worker.decode_buckets import DecodeInputs
    from dstp.worker.step_inputs import StepInputs
    from dstp.worker.step_plan import StepPlan


@dataclass
class AttentionMetadata:
    """Where each packed token goes and what each sequence attends to (same on all ranks)."""

    cache: PagedKVCache
    backend: AttentionBackend
    slot_mapping: torch.Tensor  # [T] cache slot of each new token (device)
    query_starts: list[int]  # [S + 1] offsets of each sequence's tokens in the packed batch
    context_lens: list[int]  # [S] tokens in cache after this step (prefix + new)
    block_slots: torch.Tensor  # [S, max_blocks * block_size] cache slots of each context (device)
    decode_seqs: frozenset[int]  # sequences with one new token, attended to as one batch
    decode_rows: torch.Tensor | None  # [D] their packed-token rows (device)
    decode_blocks: torch.Tensor | None  # [D, B] their block tables (device)
    decode_valid: torch.Tensor | None  # [D, B * block_size] keys each may see (device)
    decode_lens: torch.Tensor | None  # [D] their context lengths (device)

    @classmethod
    def build(
        cls,
        plan: StepPlan,
        inputs: StepInputs,
        cache: PagedKVCache,
        backend: AttentionBackend,
    ) -> AttentionMetadata:
        bs = cache.shape.block_size
        offsets = torch.arange(bs, device=inputs.block_tables.device)
        block_slots = (inputs.block_tables.unsqueeze(-1) * bs + offsets).flatten(1)
        decode_valid = None
        if inputs.decode_lens is not None:
            keys = torch.arange(inputs.decode_blocks.shape[1] * bs, device=offsets.device)
            decode_valid = keys < inputs.decode_lens.unsqueeze(1)
        return cls(
            cache=cache,
            backend=backend,
            slot_mapping=inputs.slot_mapping,
            query_starts=plan.query_starts.tolist(),  # host arrays: no device sync
            context_lens=plan.context_lens.tolist(),
            block_slots=block_slots,
            decode_seqs=frozenset(plan.batched_decode_seqs()),
            decode_rows=inputs.decode_rows,
            decode_blocks=inputs.decode_blocks,
            decode_valid=decode_valid,
            decode_lens=inputs.decode_lens,
        )

    @classmethod
    def for_decode_bucket(
        cls, inputs: DecodeInputs, cache: PagedKVCache, backend: AttentionBackend
    ) -> AttentionMetadata:
        """A bucketed decode step's metadata (:mod:`dstp.worker.decode_buckets`), made once
        per bucket and cache: every row decodes, every tensor is a preallocated buffer the
        step fills in place, and no Python value in it changes from step to step (so a
        compiled forward reading it is never re-specialised)."""
        rows = inputs.rows
        return cls(
            cache=cache,
            backend=backend,
            slot_mapping=inputs.slot_mapping,
            query_starts=[],  # no prefill: the backends' per-sequence loop is empty
            context_lens=[],
            block_slots=rows.new_empty((0, 0)),
            decode_seqs=frozenset(range(rows.numel())),
            decode_rows=rows,
            decode_blocks=inputs.block_tables,
            decode_valid=inputs.valid,
            decode_lens=inputs.context_lens,
        )


_CURRENT: AttentionMetadata | None = None


@contextlib.contextmanager
def step_context(metadata: AttentionMetadata) -> Iterator[None]:
    """Make ``metadata`` what every attention layer of this forward reads."""
    global _CURRENT
    _CURRENT = metadata
    try:
        yield
    finally:
        _CURRENT = None


def current_step() -> AttentionMetadata:
    if _CURRENT is None:
        raise RuntimeError("dstp paged attention called outside an engine step")
    return _CURRENT
