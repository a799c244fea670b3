"""Decode steps replayed as CUDA graphs: one graph per decode shape, captured at start-up.

A small model's decode step on a GPU costs what the host spends launching its few
hundred kernels, not what they compute. A CUDA graph records a step's kernels once
and replays them in one launch, on the same addresses: that is why the bucketed
decode (:mod:`dstp.worker.decode_buckets`) writes each step's inputs into buffers
allocated once and keeps the LM head and the sampler outside. Capture follows
vLLM's: largest shape first, every graph in one shared memory pool (one shape's
activations at a time), an eager warm-up run on a side stream before each capture.
A shape is a batch bucket by a block-table width (:class:`BucketedDecode`).

A graph holds the addresses of the cache it was captured over, so a step over any
other cache (the start-up probe's scratch one) runs eagerly. A capture that fails
(an op that syncs with the host, say) leaves every shape eager and says why: the
server still serves, only slower.

How capture and replay are done is a :class:`GraphApi`: CUDA's by default; the tests
use one that re-runs the forward on replay, which checks the same contract on a CPU
(each replay reads the buffers as the step left them, and returns the same tensor).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from dstp.worker.decode_buckets import Shape

log = logging.getLogger("dstp")

Forward = Callable[[], torch.Tensor]


class GraphApi(Protocol):
    """Records ``forward`` once and replays it; ``pool`` is shared between captures."""

    def capture(self, forward: Forward, pool: Any) -> tuple[Any, torch.Tensor, Any]:
        """(the graph, its output tensor, the pool for the next capture)."""
        ...

    def replay(self, graph: Any) -> None: ...


class CudaGraphApi:
    """``torch.cuda.CUDAGraph`` capture after an eager warm-up on a side stream."""

    def __init__(self, device: torch.device, warm_up_runs: int = 2) -> None:
        self.device = device
        self.warm_up_runs = warm_up_runs  # lazy initialisations (cuBLAS handles) happen here

    def capture(self, forward: Forward, pool: Any) -> tuple[Any, torch.Tensor, Any]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warm_up_runs):
                forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = forward()
        return graph, output, graph.pool()

    def replay(self, graph: Any) -> None:
        graph.replay()


class DecodeGraphs:
    """The captured decode forward of every shape, over the one cache they were captured on."""

    def __init__(self, api: GraphApi) -> None:
        self.api = api
        self.failure: str | None = None  # why capture was given up, if it was
        self.capture_seconds = 0.0  # the last capture_all's, failed or not
        self._graphs: dict[Shape, tuple[Any, torch.Tensor]] = {}
        self._cache: object | None = None
        self._pool: Any = None

    @classmethod
    def for_device(cls, device: torch.device) -> DecodeGraphs:
        return cls(CudaGraphApi(device))

    @property
    def shapes(self) -> tuple[Shape, ...]:
        return tuple(sorted(self._graphs))

    def capture_all(
        self, shapes: tuple[Shape, ...], cache: object, prepare: Callable[[Shape], Forward]
    ) -> None:
        """Capture each shape's forward over ``cache``, largest first (the shared pool then
        never grows); ``prepare(shape)`` fills the shape's buffers and returns its forward.
        On a failure every graph is dropped and decode runs eagerly."""
        started = time.perf_counter()
        self._graphs.clear()
        self._cache = cache
        try:
            for shape in sorted(shapes, reverse=True):
                graph, output, self._pool = self.api.capture(prepare(shape), self._pool)
                self._graphs[shape] = (graph, output)
        except Exception as exc:  # the model has an op a graph cannot hold: serve eagerly
            self._graphs.clear()
            self.failure = f"{type(exc).__name__}: {exc}"
            log.warning(
                "CUDA graph capture failed, decode runs eagerly: %s", self.failure, exc_info=True
            )
            return
        finally:
            self.capture_seconds = time.perf_counter() - started
        log.info(
            "decode captured as CUDA graphs at %d shapes in %.1f s",
            len(self._graphs),
            self.capture_seconds,
        )

    def replay(self, shape: Shape, cache: object) -> torch.Tensor | None:
        """The shape's output after a replay over the buffers as they are now; None where
        no graph was captured for this shape and cache."""
        entry = self._graphs.get(shape) if cache is self._cache else None
        if entry is None:
            return None
        graph, output = entry
        self.api.replay(graph)
        return output
