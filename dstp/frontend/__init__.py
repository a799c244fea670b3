"""Supervised mode: a front-end process that outlives the engine ranks and replays requests.

``dstp serve --tensor-parallel-size N`` run outside any launcher starts this front-end. It
owns the HTTP port, the tokenizer, the metrics and a journal of every request in flight,
and starts the ranks itself as an *engine job* under the ``deepspeed`` launcher. When a
rank dies, the job is killed and started again and every request is resubmitted with the
tokens it already emitted, so clients see a pause instead of an error.

* :mod:`~dstp.frontend.serve`: when supervised mode applies, and the front-end's start-up.
* :mod:`~dstp.frontend.job`: :class:`EngineJob`, one launcher run, killed and cleaned whole.
* :mod:`~dstp.frontend.wire`: the link to the job's rank 0 (the replicas' messages).
* :mod:`~dstp.frontend.journal`: what each request emitted, to replay it.
* :mod:`~dstp.frontend.engine`: :class:`SupervisedEngine`, the server's engine: it routes,
  journals, restarts the job and replays into it.
"""

import os

ADDRESS_ENV = "DSTP_FRONTEND_ADDRESS"  # host:port the front-end listens on
KEY_ENV = "DSTP_FRONTEND_KEY"  # the job's authentication key, hex


def under_frontend() -> bool:
    """Whether this rank belongs to an engine job that a front-end started."""
    return bool(os.environ.get(ADDRESS_ENV))


LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")  # set by deepspeed, torchrun, mpirun...


def supervised(args) -> bool:
    """Outside any launcher, a TP size above 1 (or ``--supervise``) makes a front-end
    (``args``: ``dstp serve``'s parsed flags)."""
    if any(name in os.environ for name in LAUNCHER_ENV):
        return False
    return args.supervise or (args.tensor_parallel_size or 1) > 1
