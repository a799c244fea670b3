"""The per-step message from rank 0 to the other ranks: two tensor broadcasts.

A fixed 8-int header (command and sizes), then one flat int64 payload with
every array of the step concatenated. No pickling on the hot path. The plan
travels over the TP group's CPU (gloo) communicator and stays on the host:
each rank uploads what its forward needs once (:mod:`dstp.worker.step_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from dstp.distributed import TPGroup


class Command(IntEnum):
    STEP = 1
    HEARTBEAT = 2
    SHUTDOWN = 3


HEADER_LEN = 8


@dataclass
class StepPlan:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    query_starts: torch.Tensor  # [S + 1]
    context_lens: torch.Tensor  # [S]
    block_tables: torch.Tensor  # [S, max_blocks]
    sample_rows: torch.Tensor  # [R] packed-token rows whose logits are sampled
    copies: torch.Tensor  # [C, 2] blocks to copy (src, dst) before the forward

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def batched_decode_seqs(self) -> list[int]:
        """Sequences with exactly one new token (host ints): attended to as one batch, a
        batch of one included, so batch-1 decode takes the same paged path."""
        lengths = (self.query_starts[1:] - self.query_starts[:-1]).tolist()
        return [i for i, n in enumerate(lengths) if n == 1]

    def _arrays(self) -> list[torch.Tensor]:
        return [
            self.input_ids,
            self.positions,
            self.slot_mapping,
            self.query_starts,
            self.context_lens,
            self.block_tables.flatten(),
            self.sample_rows,
            self.copies.flatten(),
        ]

    def header(self) -> torch.Tensor:
        s, max_blocks = self.block_tables.shape
        return torch.tensor(
            [
                Command.STEP,
                self.num_tokens,
                s,
                max_blocks,
                self.sample_rows.numel(),
                self.copies.shape[0],
                0,
                0,
            ],
            dtype=torch.long,
        )

    def payload(self) -> torch.Tensor:
        return torch.cat([a.long() for a in self._arrays()])

    @classmethod
    def from_wire(cls, header: torch.Tensor, payload: torch.Tensor) -> StepPlan:
        _, t, s, mb, r, c, _, _ = header.tolist()
        sizes = [t, t, t, s + 1, s, s * mb, r, 2 * c]
        parts = torch.split(payload, sizes)
        return cls(
            parts[0],
            parts[1],
            parts[2],
            parts[3],
            parts[4],
            parts[5].view(s, mb),
            parts[6],
            parts[7].view(c, 2),
        )

    @staticmethod
    def payload_len(header: torch.Tensor) -> int:
        _, t, s, mb, r, c, _, _ = header.tolist()
        return 3 * t + (s + 1) + s + s * mb + r + 2 * c


def send_command(tp: TPGroup, command: Command) -> None:
    header = torch.zeros(HEADER_LEN, dtype=torch.long)
    header[0] = command
    tp.broadcast_host(header)


def send_plan(tp: TPGroup, plan: StepPlan) -> None:
    tp.broadcast_host(plan.header())
    tp.broadcast_host(plan.payload())


def receive(tp: TPGroup) -> tuple[Command, StepPlan | None]:
    header = tp.broadcast_host(torch.zeros(HEADER_LEN, dtype=torch.long))
    command = Command(int(header[0]))
    if command != Command.STEP:
        return command, None
    payload = tp.broadcast_host(torch.empty(StepPlan.payload_len(header), dtype=torch.long))
    return command, StepPlan.from_wire(header, payload)
