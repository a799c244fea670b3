"""``ReplicatedEngine``: global rank 0's engine over every replica (one local, the rest remote)."""

from __future__ import annotations

import contextlib
import queue
import time
from typing import TYPE_CHECKING, Any

from dstp.engine.loop import Liveness
from dstp.engine.outputs import RequestOutput
from dstp.engine.sampling_params import InvalidRequest, SamplingParams
from dstp.replicas.layout import ReplicaLayout
from dstp.replicas.proxy import RemoteReplica
from dstp.replicas.router import Router
from dstp.replicas.transport import Link

if TYPE_CHECKING:
    from dstp.engine.llm_engine import Engine

IDLE_WAIT_S = 0.01  # rank 0, idle itself, waits this long for remote outputs per step()
LOCAL_HEARTBEAT_S = 1.0  # replica 0's ranks are probed this often while only others work


class ReplicatedEngine:
    """The server's engine on global rank 0 when there are several replicas.

    Replica 0 is ``local`` (this process is its driver rank); the others are
    :class:`RemoteReplica` proxies. A request lives on one replica from admission to
    its end: its outputs, abort and KV blocks all stay there, and seeded sampling
    derives its generators from the request's seed only, so it reads the same on any
    replica.
    """

    def __init__(
        self,
        local: Engine,
        links: dict[int, Link],
        liveness_timeout_s: float = 30.0,
        step_timeout_s: float = 600.0,
    ) -> None:
        self.local = local
        self.tp = local.tp
        self.layout = ReplicaLayout(self.tp.world_size, self.tp.size)
        self.liveness = Liveness(liveness_timeout_s, step_timeout_s)
        self._outputs: queue.Queue = queue.Queue()
        self.remotes = {
            r: RemoteReplica(r, self.layout.describe(r), link, self._outputs, self.liveness)
            for r, link in sorted(links.items())
        }
        self.router = Router(self.layout.num_replicas, local.config.block_size)
        self.model_name = local.model_name
        self.vocab_size = local.vocab_size
        self.tokenizer = local.tokenizer
        self.eos_ids = local.eos_ids
        self.config = local.config
        self.max_model_len = min(
            [local.max_model_len] + [r.hello.max_model_len for r in self.remotes.values()]
        )
        self.num_steps = 0
        self._local_beat = time.monotonic()

    @property
    def num_replicas(self) -> int:
        return self.layout.num_replicas

    # -- requests -------------------------------------------------------------------------
    def check_request(
        self, prompt_token_ids: list[int], params: SamplingParams, max_model_len: int | None = None
    ) -> None:
        """Replica 0's checks against the shortest context of the replicas (a request may go
        to any of them)."""
        self.local.check_request(
            prompt_token_ids, params, max_model_len=max_model_len or self.max_model_len
        )

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        if self.router.replica_of(request_id) is not None:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        self.check_request(prompt_token_ids, params)
        replica = self.router.choose(prompt_token_ids)
        if replica == 0:
            self.local.add_request(request_id, prompt_token_ids, params)
        else:
            self.remotes[replica].add(request_id, prompt_token_ids, params)
        self.router.assign(request_id, replica, prompt_token_ids, params)

    def running_request_ids(self) -> set[str]:
        """Replica 0's (the others' requests end their queue time at their first output)."""
        return self.local.running_request_ids()

    def abort(self, request_id: str) -> None:
        replica = self.router.replica_of(request_id)
        if replica == 0:
            self.local.abort(request_id)
        elif replica is not None:
            self.remotes[replica].abort(request_id)

    def replica_of(self, request_id: str) -> int | None:
        return self.router.replica_of(request_id)

    def has_unfinished(self) -> bool:
        return self.local.has_unfinished() or bool(self.router.routes) or not self._outputs.empty()

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Send the remotes what arrived, step replica 0 if it has work, and collect every
        output the remotes sent meanwhile (waiting briefly when replica 0 is idle)."""
        for remote in self.remotes.values():
            remote.flush()
        self._check()
        outputs: list[RequestOutput] = []
        if self.local.has_unfinished():
            outputs += self.local.step()
            self.num_steps += 1
            self._local_beat = time.monotonic()
        else:
            if time.monotonic() - self._local_beat >= LOCAL_HEARTBEAT_S:
                self.local.heartbeat()  # replica 0 idles while others work: still probe it
                self._local_beat = time.monotonic()
            with contextlib.suppress(queue.Empty):
                outputs += self._outputs.get(timeout=IDLE_WAIT_S) or []
        while True:
            try:
                outputs += self._outputs.get_nowait() or []  # None: a failure woke us
            except queue.Empty:
                break
        self._check()
        for out in outputs:
            self.router.progress(out)
        return outputs

    def _check(self) -> None:
        for remote in self.remotes.values():
            remote.check()

    def heartbeat(self) -> None:
        """Replica 0's ranks answer; the other replicas reported within the timeout."""
        self.local.heartbeat()
        for remote in self.remotes.values():
            remote.flush()
        self._check()

    def stats(self) -> dict[str, Any]:
        """The replicas' stats summed (``kv_usage`` and the hit rate recomputed), plus
        ``replicas``: each replica's own, with its ``outstanding_requests``,
        ``outstanding_tokens`` and ``assigned_requests``."""
        per = [self.local.stats()] + [dict(r.stats) for r in self.remotes.values()]
        for i, s in enumerate(per):
            s["outstanding_requests"] = self.router.outstanding(i)
            s["outstanding_tokens"] = self.router.load[i]
            s["assigned_requests"] = self.router.assigned[i]
            s["healthy"] = i == 0 or self.remotes[i].failure is None
        total = _sum_stats(per)
        total["num_replicas"] = len(per)
        total["replicas"] = per
        return total

    def shutdown(self) -> None:
        """Release every replica's ranks: the remote driver ranks release their followers."""
        for remote in self.remotes.values():
            remote.shutdown()
        self.local.shutdown()

    def run_follower(self) -> None:
        raise RuntimeError("global rank 0 is replica 0's driver rank; it never follows")

    def generate(self, prompts: list, params: Any) -> list[RequestOutput]:
        """Run prompts to completion over every replica; results in prompt order."""
        from dstp.engine.llm_engine import generate_to_completion

        return generate_to_completion(self, prompts, params)


def _sum_stats(per: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers summed, flags and-ed; ``kv_usage`` and the prefix-cache hit rate recomputed."""
    total: dict[str, Any] = {}
    for s in per:
        for key, value in s.items():
            if isinstance(value, bool):
                total[key] = total.get(key, True) and value
            elif isinstance(value, (int, float)):
                total[key] = total.get(key, 0) + value
    blocks = total.get("kv_blocks_total", 0)
    if blocks:
        total["kv_usage"] = (blocks - total.get("kv_blocks_free", 0)) / blocks
    queries = total.get("prefix_cache_queries", 0)
    total["prefix_cache_hit_rate"] = total.get("prefix_cache_hits", 0) / queries if queries else 0.0
    return total
