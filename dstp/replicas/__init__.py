"""Data-parallel replicas: W ranks as W / T engine replicas of T-way tensor parallelism.

``--tensor-parallel-size T`` with a launcher world of W ranks makes W / T replicas,
each a TP group of T consecutive global ranks with its own KV cache, scheduler and
driver rank (rank 0 of the group; :mod:`dstp.distributed` builds the groups). Global
rank 0 is replica 0's driver rank and also serves HTTP; it routes every request to one
replica.

* :mod:`~dstp.replicas.layout`: :class:`ReplicaLayout`, which ranks make which replica,
  and the one check that a TP size fits the world.
* :mod:`~dstp.replicas.router`: :class:`Router`, the replica with the fewest outstanding
  tokens (prompt not yet prefilled + tokens still to generate); with a near tie, the one
  that last served the longest shared prompt prefix (its prefix cache holds it).
* :mod:`~dstp.replicas.transport`: the typed messages and the link between rank 0 and
  the other replicas' driver ranks (:func:`connect`).
* :mod:`~dstp.replicas.engine`: :class:`ReplicatedEngine` on global rank 0, the engine the
  server's engine loop drives, over the local replica and one
  :class:`~dstp.replicas.proxy.RemoteReplica` per other replica.
* :mod:`~dstp.replicas.server`: :func:`serve_replica`, the engine loop on the other
  replicas' driver ranks.
"""

from dstp.replicas.engine import ReplicatedEngine
from dstp.replicas.layout import ReplicaLayout, tp_size_error, valid_tp_sizes
from dstp.replicas.router import Router
from dstp.replicas.server import serve_replica
from dstp.replicas.transport import Link, connect

__all__ = [
    "Link",
    "ReplicaLayout",
    "ReplicatedEngine",
    "Router",
    "connect",
    "serve_replica",
    "tp_size_error",
    "valid_tp_sizes",
]
