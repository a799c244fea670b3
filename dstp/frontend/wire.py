"""The link between the front-end and its engine job's rank 0.

The same typed messages as between data-parallel replicas
(:mod:`dstp.replicas.transport`): the engine job's rank 0 is driven exactly like another
replica's driver rank. The front-end listens; the job's rank 0 connects, authenticated by a
key drawn per job, and says :class:`~dstp.replicas.transport.Hello`. Address and key travel
in the environment (and, across nodes, in a DeepSpeed environment file), never on a
command line.
"""

from __future__ import annotations

import os
import secrets
from multiprocessing.connection import Client, Listener

from dstp.frontend import ADDRESS_ENV, KEY_ENV
from dstp.replicas.transport import Hello, Link


class FrontendListener:
    """The front-end's end: one listening socket per engine job and its key."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.key = secrets.token_bytes(32)
        self._listener = Listener((host, 0), authkey=self.key)
        self.address = f"{host}:{self._listener.address[1]}"

    def env(self) -> dict[str, str]:
        return {ADDRESS_ENV: self.address, KEY_ENV: self.key.hex()}

    def accept(self) -> Link:
        """The job's rank 0, once it has connected and said Hello (blocks)."""
        conn = self._listener.accept()
        hello = conn.recv()
        if not isinstance(hello, Hello):
            conn.close()
            raise ConnectionError(f"expected the engine job's Hello, got {type(hello).__name__}")
        return Link(conn, hello)

    def close(self) -> None:
        self._listener.close()


def connect_to_frontend(engine) -> Link:
    """The engine job's rank 0: connect to the front-end and say what it serves."""
    host, port = os.environ[ADDRESS_ENV].rsplit(":", 1)
    link = Link(Client((host, int(port)), authkey=bytes.fromhex(os.environ[KEY_ENV])))
    link.send(
        Hello(
            0,
            engine.max_model_len,
            engine.vocab_size,
            os.getpid(),
            engine.stats(),
            eos_ids=frozenset(engine.eos_ids),
            model_name=engine.model_name,
            block_size=engine.config.block_size,
        )
    )
    return link
