"""Decode steps at fixed shapes: padded batch-size buckets over inputs allocated once.

A step whose sequences each bring exactly one new token (a decode-only step) can run at
the smallest *bucket* (vLLM's CUDA-graph capture sizes: 1, 2, 4, 8, then every multiple
of 8 up to ``max_num_seqs``) not below its batch, with block tables padded to the
smallest *width* (16, 32, 64, ... blocks, up to ``max_model_len``) that holds its longest
context: the decode attention gathers every block of the table, so padding short
contexts to the full length would gather what no row attends to. Its token ids,
positions, cache slots, context lengths and block tables are written, in place, into
device buffers allocated at start-up (the largest bucket times the most blocks a
sequence may hold); every tensor the decode forward reads then has the same shape and
the same address at every step of a shape (bucket x width), which is what capturing the
step as a CUDA graph needs (``--cuda-graphs``, :mod:`dstp.worker.cuda_graphs`), and what
``torch.compile(fullgraph=True, dynamic=False)`` proves on a CPU (``--compile-decode``;
every shape is compiled at start-up, after the start-up probe).

Padding rows are invisible to results: each writes its new K/V to the cache's scratch
block (one block past those the allocator hands out, :class:`PagedKVCache`), attends to
that block alone, and its hidden state is dropped before the LM head. Decode is row-wise
(every op of a decoder layer treats each token on its own, and each row attends to its
own blocks), so a real row gets, bit for bit, the logits it gets beside any other rows in
a step of the same size (tests/worker/test_decode_buckets.py). Against the unpadded step
of fewer rows it agrees to rounding only: a BLAS GEMM rounds a row differently with the
call's row count (benchmarks/FINDINGS.md).

What stays on the host, outside the fixed-shape forward: choosing the shape and packing
the one upload. After it, the sampled rows' hidden states (never a padding row's) are
picked for the LM head, whose logits are gathered and sampled per real row as before.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dstp.worker.attention.metadata import AttentionMetadata, step_context
from dstp.worker.cuda_graphs import DecodeGraphs
from dstp.worker.kv_cache import PagedKVCache
from dstp.worker.step_inputs import StepUploader
from dstp.worker.step_plan import StepPlan

if TYPE_CHECKING:
    from dstp.worker.attention.backends import AttentionBackend

log = logging.getLogger("dstp")


def bucket_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, 16, 24, ... (multiples of 8) below ``max_num_seqs``, then it."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
    small = [s for s in (1, 2, 4) if s < max_num_seqs]
    return (*small, *range(8, max_num_seqs, 8), max_num_seqs)


# The narrowest block table a decode step is padded to: its rows' attention gathers every
# block of the table, so a step of short contexts in the full width (max_model_len) gathered
# up to 16x more K/V than it attends to (64 rows on an H200: graphs 0.84x eager, FINDINGS).
MIN_WIDTH_BLOCKS = 16


def width_sizes(width: int) -> tuple[int, ...]:
    """Block-table widths a step is padded to: 16, 32, 64, ... blocks below ``width``,
    then ``width`` (the most a sequence may hold)."""
    sizes = []
    w = MIN_WIDTH_BLOCKS
    while w < width:
        sizes.append(w)
        w *= 2
    return (*sizes, width)


def bucket_for(num_seqs: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds ``num_seqs`` sequences (or blocks), or None past the
    largest."""
    at = bisect.bisect_left(sizes, num_seqs)
    return sizes[at] if at < len(sizes) else None


Shape = tuple[int, int]  # a padded decode step: (rows, block-table width)


@dataclass
class DecodeInputs:
    """One shape's views of the preallocated buffers: the same tensors at every step."""

    input_ids: torch.Tensor  # [b]
    positions: torch.Tensor  # [b]
    slot_mapping: torch.Tensor  # [b] padding rows: the scratch block's first slot
    context_lens: torch.Tensor  # [b] padding rows: 1
    block_tables: torch.Tensor  # [b, w] padding rows and columns: the scratch block
    rows: torch.Tensor  # [b] 0..b-1 (constant): the packed rows the decode batch occupies
    valid: torch.Tensor  # [b, w * block_size] keys each row may see (filled per step)


class DecodeBuffers:
    """Every shape's inputs in one device buffer of int64, allocated once.

    Shape ``(b, w)`` uses the buffer's first ``b * (5 + w)`` values: ``b`` token ids,
    ``b`` positions, ``b`` slots, ``b`` context lengths, ``b x w`` block-table entries,
    then up to ``b`` sampled rows (read after the forward, outside the fixed shapes). The
    packed host arrays are copied into that prefix in one copy, so a step's upload is
    still one transfer and lands where the last step's did.
    """

    def __init__(self, max_bucket: int, width: int, block_size: int, device: torch.device):
        self.max_bucket = max_bucket
        self.width = width
        self.block_size = block_size
        self.flat = torch.zeros(max_bucket * (5 + width), dtype=torch.long, device=device)
        self._rows = torch.arange(max_bucket, device=device)
        self._keys = torch.arange(width * block_size, device=device)
        self._valid = torch.zeros((max_bucket, width * block_size), dtype=torch.bool, device=device)
        self._views: dict[Shape, DecodeInputs] = {}

    def inputs(self, shape: Shape) -> DecodeInputs:
        """Shape ``(b, w)``'s views (made once, then the same objects every step)."""
        views = self._views.get(shape)
        if views is None:
            (b, w), flat = shape, self.flat
            keys = w * self.block_size
            views = DecodeInputs(
                input_ids=flat[0:b],
                positions=flat[b : 2 * b],
                slot_mapping=flat[2 * b : 3 * b],
                context_lens=flat[3 * b : 4 * b],
                block_tables=flat[4 * b : 4 * b + b * w].view(b, w),
                rows=self._rows[:b],
                valid=self._valid[:b, :keys],
            )
            self._views[shape] = views
        return views

    def sample_rows(self, shape: Shape, count: int) -> torch.Tensor:
        """The ``count`` sampled rows packed after shape ``shape``'s inputs."""
        start = shape[0] * (4 + shape[1])
        return self.flat[start : start + count]

    def refresh_valid(self, inputs: DecodeInputs) -> None:
        """``valid[s, j] = j < context_lens[s]``, written in place (fixed shape, on device)."""
        keys = self._keys[: inputs.valid.shape[1]]
        torch.lt(keys, inputs.context_lens.unsqueeze(1), out=inputs.valid)

    def blocks_needed(self, plan: StepPlan) -> int:
        """The most blocks any of the plan's contexts spans (host arrays: no device read)."""
        return -(-int(plan.context_lens.max()) // self.block_size) if plan.num_tokens else 0

    def host_arrays(self, plan: StepPlan, shape: Shape, scratch_block: int) -> list[torch.Tensor]:
        """The plan's arrays padded to ``shape``, in the buffer's order (host only)."""
        n, (b, w) = plan.num_tokens, shape
        need = self.blocks_needed(plan)
        tables = torch.full((b, w), scratch_block, dtype=torch.long)
        tables[:n, :need] = plan.block_tables[:, :need]
        return [
            _padded(plan.input_ids, b, 0),
            _padded(plan.positions, b, 0),
            _padded(plan.slot_mapping, b, scratch_block * self.block_size),
            _padded(plan.context_lens, b, 1),
            tables.view(-1),
            plan.sample_rows,
        ]


_EMPTY = torch.zeros(0, dtype=torch.long)
_NO_ROWS = StepPlan(  # a decode step of no sequence: every row of a bucket is padding
    _EMPTY, _EMPTY, _EMPTY, torch.zeros(1, dtype=torch.long), _EMPTY,
    torch.zeros((0, 1), dtype=torch.long), _EMPTY, torch.zeros((0, 2), dtype=torch.long),
)  # fmt: skip


def _padded(values: torch.Tensor, size: int, fill: int) -> torch.Tensor:
    out = torch.full((size,), fill, dtype=torch.long)
    out[: values.numel()] = values
    return out


def is_decode_only(plan: StepPlan) -> bool:
    """Every sequence of the step brings exactly one new token (host arrays only)."""
    return plan.num_tokens == plan.context_lens.numel() and plan.num_tokens > 0


DecodeForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def compiled_forward(
    forward: DecodeForward, backend: str | Callable, graphs: int = 64
) -> DecodeForward:
    """``forward`` under ``torch.compile(fullgraph=True, dynamic=False)``: one graph per
    shape, each compiled on its first step, none after (static shapes, static buffers).

    Dynamo's per-function recompile limit (8) is raised to ``graphs`` (every shape, over
    the probe's cache and the step's), and dstp's CPU kernels are built first, so the
    tracer sees them as ops (:mod:`dstp.cpu.opaque_ops`).

    ``backend``: Dynamo's "eager" keeps the paged cache's in-place writes as they are;
    AOTAutograd's backends ("aot_eager", "inductor") functionalize them into copies of the
    whole cache per step unless a pass re-inplaces them (benchmarks/FINDINGS.md).
    """
    import torch._dynamo

    from dstp.cpu import opaque_ops

    opaque_ops.prepare()  # dstp's CPU kernels as ops the compiler keeps whole
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), graphs))
    return torch.compile(forward, backend=backend, fullgraph=True, dynamic=False)


class BucketedDecode:
    """A runner's decode-only steps at padded shapes, over :class:`DecodeBuffers`.

    A step's shape is its batch bucket (:func:`bucket_sizes`) by the width bucket of its
    longest context (:func:`width_sizes`). ``forward(input_ids [b], positions [b]) ->
    hidden [b, hidden]`` is the decoder stack (the LM head stays outside, as in vLLM's
    graphs); with ``compile_backend`` it runs compiled (:func:`compiled_forward`); with
    ``graphs`` each shape is captured at start-up and replayed
    (:mod:`dstp.worker.cuda_graphs`). ``compile_seconds`` holds each shape's first
    (compiling) call, per cache it ran over.
    """

    def __init__(
        self,
        forward: DecodeForward,
        *,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        compile_backend: str | Callable | None = None,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.sizes = bucket_sizes(max_num_seqs)
        self.widths = width_sizes(-(-max_model_len // block_size))
        self.shapes: tuple[Shape, ...] = tuple((b, w) for b in self.sizes for w in self.widths)
        self.buffers = DecodeBuffers(self.sizes[-1], self.widths[-1], block_size, device)
        self.compiled = compile_backend is not None
        most_graphs = 2 * len(self.shapes) + 8
        self.forward = (
            compiled_forward(forward, compile_backend, most_graphs) if self.compiled else forward
        )
        self.graphs = graphs
        self.compile_seconds: dict[tuple[Shape, int], float] = {}
        self._metadata: dict[Shape, AttentionMetadata] = {}

    def shape_for(self, plan: StepPlan) -> Shape | None:
        """The smallest shape that holds a decode-only ``plan``, or None past the largest."""
        bucket = bucket_for(plan.num_tokens, self.sizes)
        width = bucket_for(max(1, self.buffers.blocks_needed(plan)), self.widths)
        return None if bucket is None or width is None else (bucket, width)

    def run(
        self,
        plan: StepPlan,
        cache: PagedKVCache,
        backend: AttentionBackend,
        uploader: StepUploader,
    ) -> torch.Tensor | None:
        """The sampled rows' hidden states ``[R, hidden]`` of a decode-only ``plan`` run at
        its shape; None (nothing run) for any other step, which takes the packed path."""
        if cache.scratch_block is None or not is_decode_only(plan):
            return None
        shape = self.shape_for(plan)
        if shape is None:
            return None
        arrays = self.buffers.host_arrays(plan, shape, cache.scratch_block)
        hidden = self._step(arrays, shape, cache, backend, uploader)
        return hidden.index_select(0, self.buffers.sample_rows(shape, plan.sample_rows.numel()))

    @torch.inference_mode()
    def warm_up(
        self, cache: PagedKVCache, backend: AttentionBackend, uploader: StepUploader
    ) -> None:
        """Compile every shape now, and capture its graph, before the first request (as
        vLLM captures its graphs at start-up): steps of padding rows alone, which write the
        scratch block and nothing else. Nothing to do uncompiled and without graphs."""
        if cache.scratch_block is None:
            return
        if self.compiled:
            start = time.perf_counter()
            for shape in self.shapes:
                self._step(self._padding(shape, cache), shape, cache, backend, uploader)
            log.info(
                "decode compiled at %d shapes (batch %s by table width %s blocks) in %.1f s",
                len(self.shapes),
                ", ".join(map(str, self.sizes)),
                ", ".join(map(str, self.widths)),
                time.perf_counter() - start,
            )
        if self.graphs is not None:
            self.graphs.capture_all(
                self.shapes,
                cache,
                lambda shape: self._padded_forward(shape, cache, backend, uploader),
            )

    def _padded_forward(
        self,
        shape: Shape,
        cache: PagedKVCache,
        backend: AttentionBackend,
        uploader: StepUploader,
    ) -> Callable[[], torch.Tensor]:
        """The shape's forward over its buffers, filled now with padding rows alone: what
        a graph captures (and later replays over whatever the buffers then hold)."""
        inputs = self._fill(self._padding(shape, cache), shape, uploader)
        metadata = self._metadata_for(shape, inputs, cache, backend)

        def forward() -> torch.Tensor:
            with step_context(metadata):
                return self.forward(inputs.input_ids, inputs.positions)

        return forward

    def _padding(self, shape: Shape, cache: PagedKVCache) -> list[torch.Tensor]:
        """A step of padding rows alone at ``shape``: it writes the scratch block only."""
        return self.buffers.host_arrays(_NO_ROWS, shape, cache.scratch_block)

    def _fill(
        self, arrays: list[torch.Tensor], shape: Shape, uploader: StepUploader
    ) -> DecodeInputs:
        """``arrays`` uploaded into the buffers: the shape's inputs, ready for its forward."""
        uploader.upload_into(arrays, self.buffers.flat)
        inputs = self.buffers.inputs(shape)
        self.buffers.refresh_valid(inputs)
        return inputs

    def _step(
        self,
        arrays: list[torch.Tensor],
        shape: Shape,
        cache: PagedKVCache,
        backend: AttentionBackend,
        uploader: StepUploader,
    ) -> torch.Tensor:
        """The shape's forward over ``arrays`` (uploaded into the buffers): ``[b, hidden]``."""
        inputs = self._fill(arrays, shape, uploader)
        if self.graphs is not None:
            hidden = self.graphs.replay(shape, cache)
            if hidden is not None:
                return hidden
        with step_context(self._metadata_for(shape, inputs, cache, backend)):
            return self._forward(shape, inputs, cache)

    def _forward(self, shape: Shape, inputs: DecodeInputs, cache: PagedKVCache) -> torch.Tensor:
        key = (shape, cache.num_blocks)
        if not self.compiled or key in self.compile_seconds:
            return self.forward(inputs.input_ids, inputs.positions)
        start = time.perf_counter()
        hidden = self.forward(inputs.input_ids, inputs.positions)
        self.compile_seconds[key] = time.perf_counter() - start
        log.info(
            "decode shape %s compiled in %.1f s (a cache of %d blocks)",
            shape,
            self.compile_seconds[key],
            cache.num_blocks,
        )
        return hidden

    def _metadata_for(
        self, shape: Shape, inputs: DecodeInputs, cache: PagedKVCache, backend: AttentionBackend
    ) -> AttentionMetadata:
        """The shape's metadata object, the same one at every step over the same cache."""
        metadata = self._metadata.get(shape)
        if metadata is None or metadata.cache is not cache or metadata.backend is not backend:
            metadata = AttentionMetadata.for_decode_bucket(inputs, cache, backend)
            self._metadata[shape] = metadata
        return metadata
