"""Data-parallel replicas: W ranks as W / T engine replicas of T-way tensor parallelism.

``--tensor-parallel-size T`` with a launcher world of W ranks makes W / T replicas,
each a TP group of T consecutive global ranks (so a group stays inside a node when T
divides the ranks per node) with its own KV cache, scheduler and driver: rank 0 of
each group (:mod:`dstp.distributed` builds the groups). Global rank 0 is the driver
of replica 0 and also serves HTTP; it routes every request to one replica.

How requests reach the other replicas' drivers: one TCP connection per replica
(``multiprocessing.connection``, an authkey drawn at random by global rank 0 and
broadcast with the port over the world's gloo group at start-up; works across nodes,
never touches the accelerator's collective backend). Traffic is batched per step and
one-way on the hot path: rank 0 sends the adds and aborts it collected since its
last step as one message; each remote driver steps on its own and sends, per step,
one message with that step's outputs and its stats. Nothing waits for a reply
per token.

* :class:`ReplicaLayout`: W, T, R and which ranks make which replica.
* :class:`Router`: the replica with the fewest outstanding tokens (prompt not yet
  prefilled + tokens still to generate); with a near tie, the one that last served
  the longest shared prompt prefix (its prefix cache holds it).
* :class:`ReplicatedEngine` (global rank 0): the :class:`~dstp.engine.llm_engine.Engine` methods
  the server's driver thread calls (``add_request``, ``abort``, ``step``,
  ``has_unfinished``, ``stats``, ``heartbeat``, ``shutdown``) over the local replica
  and one :class:`RemoteReplica` proxy per other replica.
* :func:`serve_replica`: the loop on the other replicas' drivers.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import torch

from dstp.engine.outputs import CompletionOutput, RequestOutput
from dstp.engine.sampling_params import InvalidRequest, SamplingParams

log = logging.getLogger("dstp")

ALIVE_INTERVAL_S = 0.5  # a remote driver reports at least this often
IDLE_WAIT_S = 0.01  # rank 0, idle itself, waits this long for remote outputs per step()
LOCAL_HEARTBEAT_S = 1.0  # replica 0's ranks are probed this often while only others work
KEY_BYTES = 32


# -- layout -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplicaLayout:
    """``world`` ranks as ``world // tp`` replicas of ``tp`` consecutive ranks."""

    world: int
    tp: int

    def __post_init__(self) -> None:
        if self.tp < 1 or self.world < 1 or self.world % self.tp:
            raise ValueError(
                f"--tensor-parallel-size {self.tp} must divide the launcher's world of "
                f"{self.world} rank(s); valid sizes: {valid_tp_sizes(self.world)}"
            )

    @property
    def num_replicas(self) -> int:
        return self.world // self.tp

    def ranks(self, replica: int) -> range:
        return range(replica * self.tp, (replica + 1) * self.tp)

    def replica_of(self, rank: int) -> int:
        return rank // self.tp

    def describe(self, replica: int) -> str:
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


def valid_tp_sizes(world: int) -> list[int]:
    return [t for t in range(1, world + 1) if world % t == 0]


# -- routing ------------------------------------------------------------------------------
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
        self._requests: dict[str, list] = {}  # id -> [replica, remaining, prompt_pending]
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

    def assign(self, request_id: str, replica: int, prompt: list[int], params: SamplingParams):
        cost = len(prompt) + params.n * params.max_tokens
        self._requests[request_id] = [replica, cost, len(prompt)]
        self.load[replica] += cost
        self.assigned[replica] += 1
        for _, key in self._keys(prompt):
            self._prefixes[key] = replica
            self._prefixes.move_to_end(key)
        while len(self._prefixes) > 65536:
            self._prefixes.popitem(last=False)

    def replica_of(self, request_id: str) -> int | None:
        entry = self._requests.get(request_id)
        return None if entry is None else entry[0]

    def progress(self, out: RequestOutput) -> None:
        entry = self._requests.get(out.request_id)
        if entry is None:
            return
        if out.finished:
            self.load[entry[0]] -= entry[1]
            del self._requests[out.request_id]
            return
        done = sum(len(c.new_token_ids) for c in out.outputs)
        if done and entry[2]:
            done, entry[2] = done + entry[2], 0  # the prompt is prefilled
        done = min(done, entry[1])
        entry[1] -= done
        self.load[entry[0]] -= done

    def outstanding(self, replica: int) -> int:
        return sum(1 for e in self._requests.values() if e[0] == replica)


# -- transport ----------------------------------------------------------------------------
def _address() -> str:
    return os.environ.get("MASTER_ADDR", "127.0.0.1")


def connect(engine, timeout_s: float = 300.0) -> dict[int, Connection] | Connection | None:
    """Every rank calls this once after building its engine (a world collective).

    Global rank 0 gets {replica: connection} for replicas 1..R-1; another replica's
    driver gets its connection to rank 0; every other rank (and every rank of a
    one-replica world) gets None.
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
    hello = {
        "replica": tp.replica,
        "max_model_len": engine.max_model_len,
        "vocab_size": engine.vocab_size,
        "pid": os.getpid(),
    }
    if tp.global_rank == 0:
        return _accept(listener, tp.num_replicas, timeout_s)
    if not tp.is_driver:
        return None
    conn = Client((_address(), port), authkey=key)
    conn.send(("hello", {**hello, "stats": engine.stats()}))
    return conn


def _accept(listener: Listener, num_replicas: int, timeout_s: float) -> dict[int, Connection]:
    """Rank 0: one connection from each other replica's driver, within ``timeout_s``."""
    links: dict[int, Connection] = {}
    hellos: dict[int, dict] = {}
    error: list[BaseException] = []

    def accept_all() -> None:
        try:
            while len(links) < num_replicas - 1:
                conn = listener.accept()
                kind, hello = conn.recv()
                assert kind == "hello", kind
                links[hello["replica"]] = conn
                hellos[hello["replica"]] = hello
        except Exception as exc:  # reported below
            error.append(exc)

    thread = threading.Thread(target=accept_all, name="dstp-replica-accept", daemon=True)
    thread.start()
    thread.join(timeout_s)
    listener.close()
    if error or len(links) < num_replicas - 1:
        missing = sorted(set(range(1, num_replicas)) - set(links))
        raise RuntimeError(
            f"replica drivers {missing} did not connect to global rank 0 within "
            f"{timeout_s:.0f} s" + (f": {error[0]!r}" if error else "")
        )
    for replica, conn in links.items():
        conn.hello = hellos[replica]  # type: ignore[attr-defined]
    return links


class _Sender:
    """A connection's send side, shared by threads."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        with self._lock:
            self.conn.send(message)


# -- rank 0: the proxies and the replicated engine -------------------------------------------
class RemoteReplica:
    """Rank 0's view of another replica: its pending messages, its outputs, its health."""

    def __init__(self, index: int, name: str, conn: Connection, outputs: queue.Queue) -> None:
        self.index, self.name = index, name
        self.hello: dict = getattr(conn, "hello", {})
        self.stats: dict = dict(self.hello.get("stats", {}))
        self._sender = _Sender(conn)
        self._conn = conn
        self._outputs = outputs
        self._pending: list[tuple] = []
        self.failure: str | None = None
        self.last_seen = time.monotonic()
        self.call: tuple[str, float] | None = None  # (what, seconds so far), as last reported
        self._closing = False
        self._thread = threading.Thread(
            target=self._receive, name=f"dstp-replica{index}-rx", daemon=True
        )
        self._thread.start()

    def add(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        self._pending.append(("add", request_id, list(prompt), params))

    def abort(self, request_id: str) -> None:
        self._pending.append(("abort", request_id))

    def flush(self) -> None:
        """Send what this step collected, as one message."""
        if self._pending and self.failure is None:
            batch, self._pending = self._pending, []
            try:
                self._sender.send(("batch", batch))
            except OSError as exc:
                self._failed(f"its connection broke: {exc!r}")

    def check(self, liveness_timeout_s: float, step_timeout_s: float) -> None:
        """Raise naming the replica when it failed, went silent, or hangs in a call."""
        if self.failure is None:
            silent = time.monotonic() - self.last_seen
            if silent > liveness_timeout_s:
                self._failed(f"silent for {silent:.0f} s (its driver is hung or unreachable)")
            elif self.call is not None:
                what, elapsed = self.call
                limit = step_timeout_s if what == "step" else liveness_timeout_s
                if elapsed > limit:
                    self._failed(f"its {what} has not returned for {elapsed:.0f} s (a rank hangs)")
        if self.failure is not None:
            raise RuntimeError(f"{self.name} failed: {self.failure}")

    def shutdown(self) -> None:
        self._closing = True
        if self.failure is None:
            self.flush()
            with contextlib.suppress(OSError):
                self._sender.send(("shutdown",))

    def _failed(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
            log.error("%s failed: %s", self.name, why)
            self._outputs.put(None)  # wake a waiting step()

    def _receive(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError) as exc:
                if not self._closing:
                    self._failed(f"its driver's connection closed ({exc!r}): a rank died")
                return
            self.last_seen = time.monotonic()
            kind = message[0]
            if kind == "out":
                _, outs, stats = message
                self.stats = stats
                self.call = None
                self._outputs.put((self.index, outs))
            elif kind == "alive":
                self.call = message[1]
                if message[2] is not None:
                    self.stats = message[2]
            elif kind == "failed":
                self._failed(message[1])
            elif kind == "bye":
                return


class ReplicatedEngine:
    """The server's engine on global rank 0 when there are several replicas.

    Replica 0 is ``local`` (this process drives its TP group); the others are
    :class:`RemoteReplica` proxies. A request lives on one replica from admission to
    its end: its outputs, abort and KV blocks all stay there, and seeded sampling
    derives its generators from the request's seed only, so it reads the same on any
    replica.
    """

    def __init__(
        self,
        local,
        links: dict[int, Connection],
        liveness_timeout_s: float = 30.0,
        step_timeout_s: float = 600.0,
    ) -> None:
        self.local = local
        self.tp = local.tp
        self.layout = ReplicaLayout(self.tp.world_size, self.tp.size)
        self._outputs: queue.Queue = queue.Queue()
        self.remotes = {
            r: RemoteReplica(r, self.layout.describe(r), conn, self._outputs)
            for r, conn in sorted(links.items())
        }
        self.liveness_timeout_s = liveness_timeout_s
        self.step_timeout_s = step_timeout_s
        self.router = Router(self.layout.num_replicas, local.config.block_size)
        self.model_name = local.model_name
        self.vocab_size = local.vocab_size
        self.tokenizer = local.tokenizer
        self.config = local.config
        self.max_model_len = min(
            [local.max_model_len]
            + [r.hello.get("max_model_len", 2**31) for r in self.remotes.values()]
        )
        self.num_steps = 0
        self._local_beat = time.monotonic()

    @property
    def scheduler(self):
        """Replica 0's scheduler (the driver reads which of its requests run)."""
        return self.local.scheduler

    @property
    def num_replicas(self) -> int:
        return self.layout.num_replicas

    # -- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        if self.router.replica_of(request_id) is not None:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        self.local.check_request(prompt_token_ids, params, max_model_len=self.max_model_len)
        replica = self.router.choose(prompt_token_ids)
        if replica == 0:
            self.local.add_request(request_id, prompt_token_ids, params)
        else:
            self.remotes[replica].add(request_id, prompt_token_ids, params)
        self.router.assign(request_id, replica, prompt_token_ids, params)

    def abort(self, request_id: str) -> None:
        replica = self.router.replica_of(request_id)
        if replica == 0:
            self.local.abort(request_id)
        elif replica is not None:
            self.remotes[replica].abort(request_id)

    def replica_of(self, request_id: str) -> int | None:
        return self.router.replica_of(request_id)

    def has_unfinished(self) -> bool:
        return (
            self.local.has_unfinished() or bool(self.router._requests) or not self._outputs.empty()
        )

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
                self._take(self._outputs.get(timeout=IDLE_WAIT_S), outputs)
        while True:
            try:
                self._take(self._outputs.get_nowait(), outputs)
            except queue.Empty:
                break
        self._check()
        for out in outputs:
            self.router.progress(out)
        return outputs

    @staticmethod
    def _take(item, outputs: list[RequestOutput]) -> None:
        if item is not None:  # None: a failure woke us (raised by _check)
            outputs += item[1]

    def _check(self) -> None:
        for remote in self.remotes.values():
            remote.check(self.liveness_timeout_s, self.step_timeout_s)

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
        total["prefix_cache_hit_rate"] = (
            total.get("prefix_cache_hits", 0) / queries if queries else 0.0
        )
        total["num_replicas"] = len(per)
        total["replicas"] = per
        return total

    def shutdown(self) -> None:
        """Release every replica's ranks: the remote drivers release their followers."""
        for remote in self.remotes.values():
            remote.shutdown()
        self.local.shutdown()

    def run_follower(self) -> None:
        raise RuntimeError("global rank 0 drives replica 0; it never follows")

    def generate(self, prompts, params) -> list[RequestOutput]:
        """Run prompts to completion over every replica; results in prompt order."""
        from dstp.engine.llm_engine import generate_to_completion

        return generate_to_completion(self, prompts, params)


# -- the other replicas' drivers ---------------------------------------------------------
def serve_replica(
    engine,
    conn: Connection,
    heartbeat_interval_s: float = 1.0,
    alive_interval_s: float = ALIVE_INTERVAL_S,
) -> int:
    """Drive this replica for global rank 0 until it says shut down; the exit code.

    Adds and aborts arrive in batches; each step's outputs and stats go back as one
    message. Idle, it heartbeats its own followers. A thread reports liveness (and
    how long the current call has run) every ``alive_interval_s``, so rank 0 tells a
    long step from a hung rank. A failure is reported to rank 0, naming this replica.
    """
    tp = engine.tp
    name = tp.describe()
    sender = _Sender(conn)
    call: list = [None]  # (what, started) while in a step or heartbeat
    stop = threading.Event()

    def alive() -> None:
        while not stop.wait(alive_interval_s):
            current = call[0]
            state = None if current is None else (current[0], time.monotonic() - current[1])
            try:
                sender.send(("alive", state, None))
            except OSError:
                return

    threading.Thread(target=alive, name="dstp-replica-alive", daemon=True).start()
    last_beat = time.monotonic()
    try:
        while True:
            busy = engine.has_unfinished()
            try:
                ready = conn.poll(0 if busy else heartbeat_interval_s)
                messages = []
                while ready:
                    messages.append(conn.recv())
                    ready = conn.poll(0)
            except (EOFError, OSError) as exc:
                log.error("%s: global rank 0 is gone (%r); stopping", name, exc)
                with contextlib.suppress(Exception):
                    engine.shutdown()  # release this replica's followers
                return 1
            early: list[RequestOutput] = []
            for message in messages:
                if message[0] == "shutdown":
                    log.info("%s: released by global rank 0", name)
                    engine.shutdown()
                    with contextlib.suppress(OSError):
                        sender.send(("bye",))
                    return 0
                for item in message[1]:
                    _apply(engine, item, early)
            if engine.has_unfinished():
                call[0] = ("step", time.monotonic())
                outs = engine.step()
                call[0] = None
                sender.send(("out", early + outs, engine.stats()))
            elif early:
                sender.send(("out", early, engine.stats()))
            elif time.monotonic() - last_beat >= heartbeat_interval_s:
                call[0] = ("heartbeat", time.monotonic())
                engine.heartbeat()
                call[0] = None
                last_beat = time.monotonic()
                sender.send(("alive", None, engine.stats()))
    except BaseException as exc:  # a collective or the shared forward failed
        log.error("%s failed: %r; stopping", name, exc, exc_info=exc)
        with contextlib.suppress(Exception):
            sender.send(("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    finally:
        stop.set()


def _apply(engine, item: tuple, early: list[RequestOutput]) -> None:
    if item[0] == "add":
        _, request_id, prompt, params = item
        try:
            engine.add_request(request_id, prompt, params)
        except Exception as exc:  # rank 0 checked it; answer with an error output
            log.exception("add_request failed for %s", request_id)
            early.append(_error_output(request_id, prompt, params, exc))
    elif item[0] == "abort":
        with contextlib.suppress(KeyError):
            engine.abort(item[1])


def _error_output(request_id: str, prompt: list[int], params, exc: BaseException):
    n = getattr(params, "n", 1)
    return RequestOutput(
        request_id,
        prompt,
        [CompletionOutput(i, [], "", finish_reason="error") for i in range(n)],
        True,
        error=f"{type(exc).__name__}: {exc}",
    )
