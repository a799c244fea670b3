"""A sequence's place in its grammar, and a batch's next-token masks.

The masks for a step depend only on the tokens accepted so far, so rank 0 computes them
in a worker while the forward runs (llguidance drops the GIL and fills rows in parallel
on its own threads); the sampler then applies them as one batched operation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.torch
import torch

_pool: ThreadPoolExecutor | None = None
_executor: llguidance.LLExecutor | None = None


class GrammarViolation(RuntimeError):
    """A token the grammar does not allow was appended (only a bug can cause this)."""


class GrammarState:
    """One sequence's llguidance matcher; forks copy it, preemption keeps it (the accepted
    tokens stay the sequence's), and :meth:`replay` rebuilds it from accepted tokens."""

    def __init__(
        self, matcher: llguidance.LLMatcher, kind: str, after_token: int | None = None
    ) -> None:
        self.matcher = matcher
        self.kind = kind
        self.waiting_for = after_token  # free output until this token (a reasoning model's end)

    @property
    def active(self) -> bool:
        """Whether the next token is constrained."""
        return self.waiting_for is None

    def fork(self) -> GrammarState:
        return GrammarState(self.matcher.deep_copy(), self.kind, self.waiting_for)

    def accept(self, token: int) -> None:
        if self.waiting_for is not None:
            if token == self.waiting_for:
                self.waiting_for = None
            return
        if not self.matcher.consume_token(token):
            raise GrammarViolation(f"token {token} breaks the {self.kind} constraint")

    def replay(self, tokens: Sequence[int]) -> None:
        """Advance a fresh matcher through tokens accepted before (a resubmitted request)."""
        for token in tokens:
            self.accept(token)

    @property
    def complete(self) -> bool:
        """Nothing more can follow (only EOS): the output is whole."""
        return self.active and self.matcher.is_stopped()


class MaskJob:
    """The next token's allowed set for each row of a step, as llguidance's packed bitmask
    (``[rows, ceil(vocab / 32)]`` int32, bit j of word w allows token 32w + j); rows
    without a grammar allow everything. Started before the forward, read after it."""

    def __init__(self, grammars: Sequence[GrammarState | None], vocab_size: int) -> None:
        rows = [(g.matcher, i) for i, g in enumerate(grammars) if g is not None and g.active]
        self._future: Future | None = None
        if rows:
            shape = llguidance.torch.get_bitmask_shape(len(grammars), vocab_size)
            bitmask = torch.full(shape, -1, dtype=torch.int32)
            self._future = _worker().submit(_fill, rows, bitmask)

    def result(self) -> torch.Tensor | None:
        """The bitmask on the host, or None when no row is constrained."""
        return None if self._future is None else self._future.result()


def _fill(rows: list[tuple[llguidance.LLMatcher, int]], bitmask: torch.Tensor) -> torch.Tensor:
    llguidance.torch.fill_next_token_bitmask_par(_llg_executor(), rows, bitmask)
    return bitmask


def _worker() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dstp-masks")
    return _pool


def _llg_executor() -> llguidance.LLExecutor:
    global _executor
    if _executor is None:  # a few threads: the forward needs the cores more
        _executor = llguidance.LLExecutor(num_threads=max(1, min(4, (os.cpu_count() or 2) // 2)))
    return _executor
