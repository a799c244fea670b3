"""Which ranks make which replica, and the one check that a TP size fits the world."""

from __future__ import annotations

from dataclasses import dataclass


def valid_tp_sizes(world: int) -> list[int]:
    """The TP sizes a world of ``world`` ranks can be cut into."""
    return [t for t in range(1, world + 1) if world % t == 0]


def tp_size_error(world: int, tp: int) -> str:
    """Why ``tp`` does not fit ``world`` ranks, and how to start the right number of ranks.

    The one message for this rule, whoever finds it (the CLI, :func:`dstp.distributed.init_tp`
    or a layout built in code).
    """
    n = max(tp, 1)
    return (
        f"--tensor-parallel-size {tp} does not fit the {world} rank(s) the launcher started "
        f"(WORLD_SIZE={world}): it must divide them (sizes that fit: {valid_tp_sizes(world)}). "
        "dstp runs one process per rank and the launcher decides how many: start it as "
        f"`deepspeed --num_gpus {n} --module dstp serve ...` or `torchrun --nproc_per_node {n} "
        "-m dstp serve ...` (across nodes: the ranks of every node together); a world of "
        "W ranks at TP=T serves W/T replicas"
    )


@dataclass(frozen=True)
class ReplicaLayout:
    """``world`` ranks as ``world // tp`` replicas of ``tp`` consecutive ranks.

    Consecutive, so a replica stays inside a node when ``tp`` divides the ranks per node.
    """

    world: int
    tp: int

    def __post_init__(self) -> None:
        if self.tp < 1 or self.world < 1 or self.world % self.tp:
            raise ValueError(tp_size_error(self.world, self.tp))

    @property
    def num_replicas(self) -> int:
        return self.world // self.tp

    def ranks(self, replica: int) -> range:
        return range(replica * self.tp, (replica + 1) * self.tp)

    def replica_of(self, rank: int) -> int:
        return rank // self.tp

    def describe(self, replica: int) -> str:
        """'replica 1 (global ranks 2-3)': how logs name a replica."""
        r = self.ranks(replica)
        ranks = f"rank {r[0]}" if self.tp == 1 else f"ranks {r[0]}-{r[-1]}"
        return f"replica {replica} (global {ranks})"

    @classmethod
    def resolve(cls, world: int, tp: int | None = None, dp: int | None = None) -> ReplicaLayout:
        """The layout from ``--tensor-parallel-size`` and ``--data-parallel-size`` (either may
        be left out; both given must multiply to the world)."""
        if dp is not None and (dp < 1 or world % dp):
            raise ValueError(
                f"--data-parallel-size {dp} must divide the launcher's world of {world} rank(s)"
            )
        if tp is None:
            tp = world // dp if dp is not None else world
        layout = cls(world, tp)
        if dp is not None and dp != layout.num_replicas:
            raise ValueError(
                f"--tensor-parallel-size {tp} x --data-parallel-size {dp} = {tp * dp} ranks, "
                f"but the launcher started {world}"
            )
        return layout
