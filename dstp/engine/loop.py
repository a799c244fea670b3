"""The engine loop every driver rank runs, and the one judge of rank liveness.

Words as used in dstp: the *driver rank* is rank 0 of a TP group (it owns the scheduler
and sampling; the other ranks follow its step plans); the *engine loop* is the one thread
on a driver rank that calls the engine (:class:`StepLoop`): the HTTP rank's
:class:`~dstp.server.engine_loop.EngineLoop` and another replica's
:class:`~dstp.replicas.server.ReplicaServer`. :class:`Liveness` decides when an engine
call, or a replica's silence, means a rank is hung or gone.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from dstp.engine.outputs import RequestOutput
from dstp.engine.protocol import EngineClient

T = TypeVar("T")


# -- liveness -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """An engine call in progress: which one, and how long it has run so far."""

    what: str  # "step" or "heartbeat"
    elapsed_s: float


class Liveness:
    """Deadlines for engine calls (collectives over every rank) and for a peer's reports.

    A step may take ``step_timeout_s`` (long prompts); any other call, and the silence
    of a replica that should report every fraction of a second, ``heartbeat_timeout_s``.
    Past that a rank is hung or gone.
    """

    def __init__(self, heartbeat_timeout_s: float = 30.0, step_timeout_s: float = 600.0):
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.step_timeout_s = step_timeout_s
        self._started: tuple[str, float] | None = None

    def timed(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, noted as the call in progress while it runs."""
        self._started = (what, time.monotonic())
        try:
            return fn()
        finally:
            self._started = None

    def current(self) -> Call | None:
        started = self._started
        return None if started is None else Call(started[0], time.monotonic() - started[1])

    def overdue(self, call: Call | None) -> str | None:
        """Why ``call`` (this loop's own, or one a replica reported) means a hung rank."""
        if call is None:
            return None
        limit = self.step_timeout_s if call.what == "step" else self.heartbeat_timeout_s
        if call.elapsed_s <= limit:
            return None
        return (
            f"engine {call.what} did not return within {limit:.0f} s: a rank is hung or unreachable"
        )

    def silent(self, last_seen: float) -> str | None:
        """Why a peer last heard from at ``last_seen`` (monotonic) counts as gone."""
        silent = time.monotonic() - last_seen
        if silent <= self.heartbeat_timeout_s:
            return None
        return f"silent for {silent:.0f} s (its driver rank is hung or unreachable)"


# -- the loop -------------------------------------------------------------------------------
class StepLoop(ABC):
    """Apply what arrived, step while there is work, heartbeat the ranks when idle.

    Subclasses say where commands come from and where outputs go. Each engine call runs
    under :attr:`liveness`, so a watchdog (or a peer) can tell a long step from a hung rank.
    """

    def __init__(
        self, engine: EngineClient, liveness: Liveness, heartbeat_interval_s: float
    ) -> None:
        self.engine = engine
        self.liveness = liveness
        self.heartbeat_interval_s = heartbeat_interval_s

    @abstractmethod
    def take(self, timeout_s: float) -> list[Any]:
        """The commands that arrived, waiting up to ``timeout_s`` for the first."""

    @abstractmethod
    def apply(self, command: Any) -> bool:
        """Apply one command; False ends the loop."""

    @abstractmethod
    def stepped(self, outputs: list[RequestOutput], started: float) -> None:
        """Hand on one step's outputs (``started``: when the step began, monotonic)."""

    @abstractmethod
    def beat(self) -> None:
        """After an idle heartbeat (every rank answered)."""

    def run_steps(self) -> None:
        """Until a command ends it; an engine call that raises ends it too, raising."""
        engine, last_call = self.engine, time.monotonic()
        while True:
            due = last_call + self.heartbeat_interval_s
            wait = 0.0 if engine.has_unfinished() else max(0.0, due - time.monotonic())
            for command in self.take(wait):
                if not self.apply(command):
                    return
            if engine.has_unfinished():
                started = time.monotonic()
                self.stepped(self.liveness.timed("step", engine.step), started)
                last_call = time.monotonic()
            elif time.monotonic() >= due:
                self.liveness.timed("heartbeat", engine.heartbeat)
                self.beat()
                last_call = time.monotonic()
