"""A step's metadata on the device: built on the host, uploaded with one copy.

Every rank turns the host :class:`StepPlan` into the flat int64 arrays its
forward indexes with (token ids, positions, cache slots, block tables, the
sampled rows, the decode batch's rows, blocks and lengths), packs them into
one (pinned, on an accelerator) host buffer and uploads it with one
non-blocking copy. Nothing in the forward then builds a tensor from Python
data or reads one back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dstp.worker.step_plan import StepPlan


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    block_tables: torch.Tensor  # [S, max_blocks]
    sample_rows: torch.Tensor  # [R]
    decode_rows: torch.Tensor | None  # [D] packed rows of the batched decode tokens
    decode_blocks: torch.Tensor | None  # [D, B] their block tables, B = max blocks they use
    decode_lens: torch.Tensor | None  # [D] their context lengths


def _host_arrays(plan: StepPlan, block_size: int) -> list[torch.Tensor]:
    arrays = [
        plan.input_ids,
        plan.positions,
        plan.slot_mapping,
        plan.block_tables,
        plan.sample_rows,
    ]
    decode = plan.batched_decode_seqs()
    if decode:
        index = torch.tensor(decode, dtype=torch.long)
        lens = plan.context_lens[index]
        width = -(-int(lens.max()) // block_size)  # host tensor: no device sync
        arrays += [plan.query_starts[index], plan.block_tables[index, :width], lens]
    return arrays


class PackedUpload:
    """int64 arrays packed into one host buffer and copied to the device in one go.

    Two host buffers alternate, each reused until a call needs a larger one; on CUDA they
    are pinned and a buffer is rewritten only after the copy that read it has finished
    (an event), so the upload never blocks the host. On a host device the buffer *is* the
    device copy: ``fresh_on_host`` gives a new one per call where views of it may outlive
    the next call (the sampler's), reuse where they do not (a step's inputs). The step's
    inputs and the sampler's per-row values both go up through this one rule.
    """

    def __init__(self, device: torch.device, fresh_on_host: bool = False) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.fresh_on_host = fresh_on_host and not self.pinned
        self._buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * 2
        self._done: list[object | None] = [None, None]
        self._turn = 0

    def upload(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The flat int64 ``parts``, concatenated, on the device."""
        total = sum(p.numel() for p in parts)
        buffer = self._host_buffer(total)
        torch.cat(parts, out=buffer[:total])
        on_device = buffer[:total].to(self.device, non_blocking=self.pinned)
        self._finish()
        return on_device

    def upload_into(self, parts: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """The flat int64 ``parts``, concatenated into the device buffer ``out``'s prefix
        (one copy, in place: the buffers a fixed-shape step reads stay where they are)."""
        total = sum(p.numel() for p in parts)
        if not self.pinned and out.device.type == "cpu":
            return torch.cat(parts, out=out[:total])  # a host device: no staging buffer
        buffer = self._host_buffer(total)
        torch.cat(parts, out=buffer[:total])
        out[:total].copy_(buffer[:total], non_blocking=self.pinned)
        self._finish()
        return out[:total]

    def _finish(self) -> None:
        if self.pinned:
            done = torch.cuda.Event()
            done.record()
            self._done[self._turn] = done
        self._turn ^= 1

    def _host_buffer(self, numel: int) -> torch.Tensor:
        if self.fresh_on_host:
            return torch.empty(numel, dtype=torch.long)
        done = self._done[self._turn]
        if done is not None:
            done.synchronize()  # the copy that last read this buffer has finished
        buffer = self._buffers[self._turn]
        if buffer.numel() < numel:
            buffer = torch.empty(
                max(numel, 2 * buffer.numel()), dtype=torch.long, pin_memory=self.pinned
            )
            self._buffers[self._turn] = buffer
        return buffer


class StepUploader:
    """A step's metadata arrays, uploaded together (:class:`PackedUpload`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._packed = PackedUpload(device)

    def upload(self, plan: StepPlan, block_size: int) -> StepInputs:
        arrays = _host_arrays(plan, block_size)
        parts = self._upload([a.reshape(-1) for a in arrays])
        shaped = [p.view(a.shape) for p, a in zip(parts, arrays, strict=True)]
        decode = shaped[5:] if len(shaped) > 5 else [None, None, None]
        return StepInputs(*shaped[:5], *decode)

    def upload_into(self, arrays: list[torch.Tensor], out: torch.Tensor) -> None:
        """A bucketed decode step's padded arrays, into its preallocated buffer (one copy)."""
        self._packed.upload_into(arrays, out)

    def _upload(self, flat: list[torch.Tensor]) -> list[torch.Tensor]:
        on_device = self._packed.upload(flat)
        return list(torch.split(on_device, [a.numel() for a in flat]))
