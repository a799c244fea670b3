"""Which replica serves a request: least outstanding tokens, prefix affinity on near ties."""

from __future__ import annotations

import collections
from dataclasses import dataclass

from dstp.engine.outputs import RequestOutput
from dstp.engine.sampling_params import SamplingParams

MAX_PREFIXES = 65536  # prefix keys remembered for affinity, least recently routed dropped first


@dataclass
class Route:
    """Where one request went and what it still costs that replica."""

    replica: int
    remaining: int  # tokens still outstanding: the prompt until prefilled, then what is left
    prompt_pending: int  # the prompt's tokens until its first output token (then 0)


class Router:
    """Least outstanding tokens, with prefix affinity when loads are close.

    A request's cost is its prompt (until its first token: then it is prefilled) plus
    ``n * max_tokens`` minus what it generated so far. Affinity: prompt prefixes at
    block boundaries (up to ``affinity_blocks`` blocks) remember the replica that last
    got them; a request goes there if that replica's load exceeds the least loaded by
    no more than the prefix tokens its cache would save.
    """

    def __init__(self, num_replicas: int, block_size: int = 16, affinity_blocks: int = 8):
        self.load = [0] * num_replicas
        self.assigned = [0] * num_replicas  # requests routed to each replica, ever
        self.block_size = block_size
        self.affinity_blocks = affinity_blocks
        self.routes: dict[str, Route] = {}
        self._prefixes: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._next = 0  # round-robin among equal loads

    def _keys(self, prompt: list[int]) -> list[tuple[int, int]]:
        """(matched tokens, key) for each block-aligned prefix, longest first."""
        bs = self.block_size
        n = min(len(prompt) // bs, self.affinity_blocks)
        return [(k * bs, hash(tuple(prompt[: k * bs]))) for k in range(n, 0, -1)]

    def choose(self, prompt: list[int]) -> int:
        n = len(self.load)
        order = [(self._next + i) % n for i in range(n)]
        best = min(order, key=lambda r: self.load[r])
        for matched, key in self._keys(prompt):
            replica = self._prefixes.get(key)
            if replica is not None:
                if self.load[replica] - self.load[best] <= matched:
                    best = replica
                break
        self._next = (best + 1) % n
        return best

    def assign(
        self, request_id: str, replica: int, prompt: list[int], params: SamplingParams
    ) -> None:
        cost = len(prompt) + params.n * params.max_tokens
        self.routes[request_id] = Route(replica, cost, len(prompt))
        self.load[replica] += cost
        self.assigned[replica] += 1
        for _, key in self._keys(prompt):
            self._prefixes[key] = replica
            self._prefixes.move_to_end(key)
        while len(self._prefixes) > MAX_PREFIXES:
            self._prefixes.popitem(last=False)

    def replica_of(self, request_id: str) -> int | None:
        route = self.routes.get(request_id)
        return None if route is None else route.replica

    def progress(self, out: RequestOutput) -> None:
        """Take what ``out`` generated (or, finished, all it still held) off its replica's load."""
        route = self.routes.get(out.request_id)
        if route is None:
            return
        if out.finished:
            self.load[route.replica] -= route.remaining
            del self.routes[out.request_id]
            return
        done = sum(len(c.new_token_ids) for c in out.outputs)
        if done and route.prompt_pending:
            done, route.prompt_pending = done + route.prompt_pending, 0  # the prompt is prefilled
        done = min(done, route.remaining)
        route.remaining -= done
        self.load[route.replica] -= done

    def outstanding(self, replica: int) -> int:
        """Requests routed to ``replica`` that have not finished."""
        return sum(1 for route in self.routes.values() if route.replica == replica)
