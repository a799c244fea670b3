"""Decode steps for the runner and engine tests: plans made by hand, staggered requests."""

from __future__ import annotations

import torch

from dstp.engine.llm_engine import Engine
from dstp.engine.outputs import CompletionOutput
from dstp.worker.step_plan import StepPlan

BLOCK_SIZE = 4


class Sequences:
    """``n`` sequences with shuffled blocks, prefilled to different lengths, then decoded."""

    def __init__(
        self, n: int, num_blocks: int, vocab: int, seed: int, block_size: int = BLOCK_SIZE
    ) -> None:
        self.block_size = block_size
        gen = torch.Generator().manual_seed(seed)
        per_seq = 6  # blocks each may fill (24 tokens)
        assert n * per_seq <= num_blocks
        self.tables = torch.randperm(num_blocks, generator=gen)[: n * per_seq].view(n, per_seq)
        self.lens = torch.randint(1, 14, (n,), generator=gen)
        self.ids = torch.randint(3, vocab, (n, per_seq * block_size), generator=gen)

    def _slots(self, seqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        bs = self.block_size
        return self.tables[seqs, positions // bs] * bs + positions % bs

    def prefill(self) -> StepPlan:
        n = len(self.lens)
        positions = torch.cat([torch.arange(int(k)) for k in self.lens])
        seq_of = torch.repeat_interleave(torch.arange(n), self.lens)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), self.lens.cumsum(0)])
        return StepPlan(
            input_ids=self.ids[seq_of, positions],
            positions=positions,
            slot_mapping=self._slots(seq_of, positions),
            query_starts=starts,
            context_lens=self.lens.clone(),
            block_tables=self.tables.clone(),
            sample_rows=starts[1:] - 1,
            copies=torch.zeros((0, 2), dtype=torch.long),
        )

    def decode(self) -> StepPlan:
        """One new token per sequence (at position ``lens``); advances ``lens``."""
        n = len(self.lens)
        positions = self.lens.clone()
        self.lens = self.lens + 1
        width = -(-int(self.lens.max()) // self.block_size)
        return StepPlan(
            input_ids=self.ids[torch.arange(n), positions],
            positions=positions,
            slot_mapping=self._slots(torch.arange(n), positions),
            query_starts=torch.arange(n + 1),
            context_lens=self.lens.clone(),
            block_tables=self.tables[:, :width].clone(),
            sample_rows=torch.arange(n),
            copies=torch.zeros((0, 2), dtype=torch.long),
        )


def serve_staggered(engine: Engine, params) -> dict[str, CompletionOutput]:
    """Six requests arriving while others decode (decode-only steps of 1-4 rows between
    prefills), served to the end: each request's first completion."""
    done: dict[str, CompletionOutput] = {}
    for i in range(6):
        engine.add_request(str(i), [5 + i, 6, 7, 8][: 2 + i % 3], params)
        for _ in range(3):
            _finished_into(engine, done)
    while engine.has_unfinished():
        _finished_into(engine, done)
    return done


def _finished_into(engine: Engine, done: dict[str, CompletionOutput]) -> None:
    for out in engine.step():
        if out.finished:
            done[out.request_id] = out.outputs[0]
