"""Global rank 0's view of another replica: what to send it, what it sent, whether it lives."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time

from dstp.engine.loop import Call, Liveness
from dstp.engine.outputs import ResumedChoice
from dstp.engine.sampling_params import SamplingParams
from dstp.replicas.transport import (
    Abort,
    Add,
    Alive,
    Batch,
    Bye,
    Failed,
    Link,
    Outputs,
    Shutdown,
)

log = logging.getLogger("dstp")


class RemoteReplica:
    """Rank 0's proxy for one other replica: its pending messages, its outputs, its health.

    A receiver thread puts each step's outputs (a list) on the shared ``outputs`` queue, or
    None to wake a waiting ``step()`` when the replica failed.
    """

    def __init__(
        self, index: int, name: str, link: Link, outputs: queue.Queue, liveness: Liveness
    ) -> None:
        assert link.hello is not None, "rank 0's links carry the replica's Hello"
        self.index, self.name = index, name
        self.hello = link.hello
        self.stats: dict = dict(self.hello.stats)
        self.failure: str | None = None
        self.last_seen = time.monotonic()
        self.call: Call | None = None  # the call in progress, as last reported
        self._link = link
        self._outputs = outputs
        self._liveness = liveness
        self._pending: list[Add | Abort] = []
        self._closing = False
        self._thread = threading.Thread(
            target=self._receive, name=f"dstp-replica{index}-rx", daemon=True
        )
        self._thread.start()

    def add(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        resume: tuple[ResumedChoice, ...] = (),
    ) -> None:
        self._pending.append(Add(request_id, list(prompt), params, resume))

    def abort(self, request_id: str) -> None:
        self._pending.append(Abort(request_id))

    def flush(self) -> None:
        """Send what this step collected, as one message."""
        if self._pending and self.failure is None:
            batch, self._pending = self._pending, []
            try:
                self._link.send(Batch(batch))
            except OSError as exc:
                self._failed(f"its connection broke: {exc!r}")

    def check(self) -> None:
        """Raise naming the replica when it failed, went silent, or hangs in a call."""
        if self.failure is None:
            why = self._liveness.silent(self.last_seen) or self._liveness.overdue(self.call)
            if why is not None:
                self._failed(why)
        if self.failure is not None:
            raise RuntimeError(f"{self.name} failed: {self.failure}")

    def shutdown(self) -> None:
        self._closing = True
        if self.failure is None:
            self.flush()
            with contextlib.suppress(OSError):
                self._link.send(Shutdown())

    def _failed(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
            log.error("%s failed: %s", self.name, why)
            self._outputs.put(None)  # wake a waiting step()

    def _receive(self) -> None:
        while True:
            try:
                message = self._link.recv()
            except (EOFError, OSError) as exc:
                if not self._closing:
                    self._failed(f"its driver rank's connection closed ({exc!r}): a rank died")
                return
            self.last_seen = time.monotonic()
            match message:
                case Outputs(outputs, stats):
                    self.stats, self.call = stats, None
                    self._outputs.put(outputs)
                case Alive(call, stats):
                    self.call = call
                    if stats is not None:
                        self.stats = stats
                case Failed(error):
                    self._failed(error)
                case Bye():
                    return
