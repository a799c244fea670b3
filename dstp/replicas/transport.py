"""The wire between global rank 0 and the other replicas' driver ranks: typed messages.

One TCP connection per replica (``multiprocessing.connection``, an authkey drawn at
random by global rank 0 and broadcast with the port over the world's gloo group at
start-up; works across nodes, never touches the accelerator's collective backend).
Traffic is batched per step and one-way on the hot path: rank 0 sends the adds and
aborts it collected since its last step as one :class:`Batch`; each replica steps on its
own and sends, per step, one :class:`Outputs` with that step's outputs and its stats.
Nothing waits for a reply per token.
"""

from __future__ import annotations

import os
import secrets
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import torch

from dstp.engine.loop import Call
from dstp.engine.outputs import RequestOutput, ResumedChoice
from dstp.engine.sampling_params import SamplingParams

KEY_BYTES = 32


# -- messages: a replica's driver rank to global rank 0 ----------------------------------------
@dataclass(frozen=True)
class Hello:
    """Sent once on connecting: what rank 0 needs to route to this replica."""

    replica: int
    max_model_len: int
    vocab_size: int
    pid: int
    stats: dict[str, Any] = field(default_factory=dict)
    # what a front-end needs to admit requests itself (dstp.frontend)
    eos_ids: frozenset[int] = frozenset()
    model_name: str = ""
    block_size: int = 16


@dataclass(frozen=True)
class Outputs:
    """One step's outputs (or rejected adds' error outputs) and the replica's stats after it."""

    outputs: list[RequestOutput]
    stats: dict[str, Any]


@dataclass(frozen=True)
class Alive:
    """Sent at least every ``alive_interval_s``: the engine call in progress, if any (so rank 0
    tells a long step from a hung rank), and fresh stats after an idle heartbeat."""

    call: Call | None
    stats: dict[str, Any] | None = None


@dataclass(frozen=True)
class Failed:
    """The replica's engine raised; it stops. ``error``: the exception, as one line."""

    error: str


@dataclass(frozen=True)
class Bye:
    """The replica released its ranks after a :class:`Shutdown`; nothing more comes."""


# -- messages: global rank 0 to a replica's driver rank ----------------------------------------
@dataclass(frozen=True)
class Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    resume: tuple[ResumedChoice, ...] = ()  # a replay: the choices' tokens so far


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Batch:
    """The adds and aborts rank 0 collected for this replica during one of its steps."""

    items: list[Add | Abort]


@dataclass(frozen=True)
class Shutdown:
    """Release this replica's ranks and answer :class:`Bye`."""


ToRankZero = Hello | Outputs | Alive | Failed | Bye
ToReplica = Batch | Shutdown


# -- the link ---------------------------------------------------------------------------------
class Link:
    """One connection between global rank 0 and a replica's driver rank.

    ``send`` is safe from several threads (the loop and the alive reporter share it);
    ``hello`` is the replica's :class:`Hello` on rank 0's side of the link.
    """

    def __init__(self, conn: Connection, hello: Hello | None = None) -> None:
        self.conn = conn
        self.hello = hello
        self._lock = threading.Lock()

    def send(self, message: ToRankZero | ToReplica) -> None:
        with self._lock:
            self.conn.send(message)

    def recv(self) -> ToRankZero | ToReplica:
        return self.conn.recv()

    def receive(self, timeout_s: float) -> list[ToReplica]:
        """What arrived, waiting up to ``timeout_s`` for the first message.

        Raises ``EOFError`` / ``OSError`` when the other side is gone.
        """
        messages = []
        ready = self.conn.poll(timeout_s)
        while ready:
            messages.append(self.conn.recv())
            ready = self.conn.poll(0)
        return messages


def _address() -> str:
    return os.environ.get("MASTER_ADDR", "127.0.0.1")


def connect(engine: Any, timeout_s: float = 300.0) -> dict[int, Link] | Link | None:
    """Every rank calls this once after building its engine (a world collective).

    Global rank 0 gets {replica: link} for replicas 1..R-1; another replica's driver
    rank gets its link to rank 0; every other rank (and every rank of a one-replica
    world) gets None.
    """
    tp = engine.tp
    if tp.num_replicas == 1:
        return None
    import torch.distributed as tdist

    listener = None
    wire = torch.zeros(1 + KEY_BYTES, dtype=torch.long)
    if tp.global_rank == 0:
        key = secrets.token_bytes(KEY_BYTES)
        listener = Listener((_address(), 0), authkey=key)
        wire[0] = listener.address[1]
        wire[1:] = torch.tensor(list(key), dtype=torch.long)
    tdist.broadcast(wire, src=0, group=tp.world_cpu_group)
    port, key = int(wire[0]), bytes(wire[1:].tolist())
    if tp.global_rank == 0:
        return _accept(listener, tp.num_replicas, timeout_s)
    if not tp.is_driver:
        return None
    link = Link(Client((_address(), port), authkey=key))
    link.send(
        Hello(tp.replica, engine.max_model_len, engine.vocab_size, os.getpid(), engine.stats())
    )
    return link


def _accept(listener: Listener, num_replicas: int, timeout_s: float) -> dict[int, Link]:
    """Rank 0: one connection from each other replica's driver rank, within ``timeout_s``."""
    links: dict[int, Link] = {}
    error: list[BaseException] = []

    def accept_all() -> None:
        try:
            while len(links) < num_replicas - 1:
                conn = listener.accept()
                hello = conn.recv()
                if not isinstance(hello, Hello):
                    raise TypeError(f"expected a Hello first, got {hello!r}")
                links[hello.replica] = Link(conn, hello)
        except Exception as exc:  # reported below
            error.append(exc)

    thread = threading.Thread(target=accept_all, name="dstp-replica-accept", daemon=True)
    thread.start()
    thread.join(timeout_s)
    listener.close()
    if error or len(links) < num_replicas - 1:
        missing = sorted(set(range(1, num_replicas)) - set(links))
        raise RuntimeError(
            f"the driver ranks of replicas {missing} did not connect to global rank 0 within "
            f"{timeout_s:.0f} s" + (f": {error[0]!r}" if error else "")
        )
    return links
