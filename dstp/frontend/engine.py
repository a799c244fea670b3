"""``SupervisedEngine``: the front-end's engine, an engine job it starts, watches and restarts.

It is the :class:`~dstp.engine.protocol.EngineClient` the HTTP server's engine loop drives.
Requests go to the job's rank 0 over the replica link; every output is journaled. When the
job fails (a rank died on any node, a step failed, a rank went silent), the job's session
is killed and reaped, a new job starts on a fresh master port, and every journaled request
is resubmitted with what it already emitted: its clients see a pause, not an error. A
request in flight across two consecutive failures is failed instead (it may be what kills
the engine); past ``max_restarts`` the front-end gives up and the server exits non-zero.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dstp.engine.loop import Liveness
from dstp.engine.outputs import RequestOutput
from dstp.engine.sampling_params import InvalidRequest, SamplingParams, check_request
from dstp.engine.structured import compiler_for
from dstp.frontend.journal import Journal
from dstp.replicas.proxy import RemoteReplica
from dstp.replicas.transport import Link

if TYPE_CHECKING:
    from dstp.frontend.serve import JobStarter

log = logging.getLogger("dstp")

WAIT_S = 0.02  # step() waits this long for the job's next outputs


@dataclass(frozen=True)
class JobShape:
    """What the server reads of ``engine.tp``: the job's TP size (the front-end itself
    holds no rank and no device)."""

    size: int
    num_replicas: int = 1
    world_size: int = 1
    device: None = None


@dataclass(frozen=True)
class JobConfig:
    """What the server reads of ``engine.config``."""

    block_size: int


class EngineGaveUp(RuntimeError):
    """The engine job failed more often than ``--max-restarts`` allows."""


class SupervisedEngine:
    """The engine as the front-end sees it: one engine job at a time, replayed into."""

    def __init__(
        self,
        starter: JobStarter,
        tokenizer: Any,
        *,
        tp_size: int = 1,
        max_restarts: int = 3,
        liveness: Liveness | None = None,
    ) -> None:
        self._starter = starter
        self.tokenizer = tokenizer
        self.max_restarts = max_restarts
        self.liveness = liveness or Liveness()
        self.journal = Journal()
        self.restarts = 0
        self.replayed = 0
        self._outputs: queue.Queue = queue.Queue()
        self._ready: list[RequestOutput] = []  # outputs made here (failed, aborted)
        self._recovery: threading.Thread | None = None
        self._recovered: Link | BaseException | None = None
        self.job = starter.spawn()
        link = starter.connect(self.job)
        self._connect(link)
        hello = link.hello
        self.model_name = hello.model_name
        self.max_model_len = hello.max_model_len
        self.vocab_size = hello.vocab_size
        self.eos_ids = frozenset(hello.eos_ids)
        self.tp = JobShape(tp_size)
        self.config = JobConfig(hello.block_size)
        self._grammars = None

    # -- the EngineClient contract ------------------------------------------------------------
    @property
    def recovering(self) -> bool:
        return self._recovery is not None

    def check_request(
        self, prompt_token_ids: list[int], params: SamplingParams, max_model_len: int | None = None
    ) -> None:
        check_request(
            prompt_token_ids,
            params,
            self.vocab_size,
            max_model_len or self.max_model_len,
            self.eos_ids,
        )
        if params.structured_outputs is not None:  # compiled (and cached) to refuse it here
            if self._grammars is None:
                self._grammars = compiler_for(self.tokenizer, self.vocab_size, self.eos_ids)
            self._grammars.matcher(params.structured_outputs)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        if request_id in self.journal:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        self.check_request(prompt_token_ids, params)
        self.journal.add(request_id, prompt_token_ids, params)
        if not self.recovering:  # else it goes with the replay
            self.remote.add(request_id, prompt_token_ids, params)

    def abort(self, request_id: str) -> None:
        if request_id not in self.journal:
            return
        if self.recovering:
            self._ready.append(self.journal.pop(request_id).abort_output())
        else:
            self.journal.requests[request_id].aborted = True  # not replayed if the job dies
            self.remote.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.journal) or bool(self._ready)

    def running_request_ids(self) -> set[str]:
        return set()  # their queue time ends at their first output

    def step(self) -> list[RequestOutput]:
        outputs = self._take_ready()
        if self.recovering:
            self._continue_recovery()
            time.sleep(WAIT_S)
            return outputs + self._take_ready()
        self.remote.flush()
        try:
            self.remote.check()
        except RuntimeError as exc:
            self._begin_recovery(str(exc))
            return outputs + self._take_ready()
        try:
            got = self._outputs.get(timeout=WAIT_S)
        except queue.Empty:
            return outputs
        while got is not None:
            outputs += [self.journal.observe(out) for out in got]
            try:
                got = self._outputs.get_nowait()
            except queue.Empty:
                break
        return outputs

    def heartbeat(self) -> None:
        """The job answers (else a recovery starts); raises only once the front-end gave up."""
        if self.recovering:
            self._continue_recovery()
            return
        try:
            self.remote.check()
        except RuntimeError as exc:
            self._begin_recovery(str(exc))

    def stats(self) -> dict[str, Any]:
        stats = dict(self.remote.stats) if not self.recovering else {}
        stats.update(
            engine_restarts=self.restarts,
            replayed_requests=self.replayed,
            recovering=int(self.recovering),
        )
        return stats

    def shutdown(self) -> None:
        """Release the job's ranks (they exit cleanly), then make sure nothing is left."""
        if self._recovery is not None:
            self._recovery.join(60)
        if not self.recovering:
            self.remote.shutdown()
            if self.job.wait(30.0) is None:
                log.warning("engine job did not exit within 30 s of its release: killing it")
        self.job.kill()

    # -- recovery ------------------------------------------------------------------------------
    def _connect(self, link: Link) -> None:
        self.remote = RemoteReplica(0, "engine job", link, self._outputs, self.liveness)

    def _begin_recovery(self, why: str) -> None:
        """The job failed: fail the requests it failed twice, restart it in the background."""
        self.restarts += 1
        dead = self.job.first_dead(wait_s=1.0)
        if dead:
            why = f"rank(s) {', '.join(map(str, dead))} died; {why}"
        log.error(
            "engine job failed (%s); in flight: %d request(s); restart %d of at most %d",
            why,
            len(self.journal),
            self.restarts,
            self.max_restarts,
        )
        if self.restarts > self.max_restarts:
            self.job.kill()
            raise EngineGaveUp(
                f"the engine job failed {self.restarts} times (--max-restarts "
                f"{self.max_restarts}); last cause: {why}"
            )
        for record in list(self.journal.requests.values()):
            record.crashes += 1
            if record.crashes >= 2:
                self.journal.pop(record.request_id)
                log.error(
                    "request %s was in flight across two consecutive engine failures: "
                    "failed, not replayed again",
                    record.request_id,
                )
                self._ready.append(
                    record.failed("in flight across two consecutive engine failures")
                )
        self._outputs = queue.Queue()  # the dead job's receiver may still put a wake-up
        self._recovered = None
        started = time.monotonic()
        self.job.kill()
        try:
            # spawned on this (the engine loop's) thread, which lives as long as the server:
            # the launcher's parent-death signal follows the thread that started it
            self.job = self._starter.spawn()
        except OSError as exc:
            self._recovered = exc
        self._recovery = threading.Thread(
            target=self._await_job, args=(self.job, started), name="dstp-recovery", daemon=True
        )
        self._recovery.start()

    def _await_job(self, job: Any, started: float) -> None:
        """The recovery thread: wait for the new job's rank 0 to connect."""
        if self._recovered is not None:  # the spawn itself failed
            return
        try:
            self._recovered = self._starter.connect(job)
            log.info("engine job restarted in %.1f s", time.monotonic() - started)
        except BaseException as exc:  # a failed start counts as another failure
            self._recovered = exc

    def _continue_recovery(self) -> None:
        """Once the new job answered: replay the journal into it (or count a failed start)."""
        if self._recovery is None or self._recovery.is_alive():
            return
        self._recovery = None
        recovered = self._recovered
        if isinstance(recovered, BaseException):
            self._begin_recovery(f"restart failed: {recovered}")
            return
        self._connect(recovered)
        self._replay()

    def _replay(self) -> None:
        for record in [r for r in self.journal.requests.values() if r.aborted]:
            self._ready.append(self.journal.pop(record.request_id).abort_output())
        records = list(self.journal.requests.values())
        for record in records:
            resume = tuple(record.resume())
            record.replayed = record.replayed or bool(resume)
            self.remote.add(record.request_id, record.prompt, record.params, resume)
        self.replayed += len(records)
        self.remote.flush()
        log.info(
            "replayed %d request(s) into the new engine job: %s",
            len(records),
            ", ".join(
                f"{r.request_id} ({sum(len(c.ids) for c in r.choices.values())} tokens)"
                for r in records
            )
            or "none",
        )

    def _take_ready(self) -> list[RequestOutput]:
        ready, self._ready = self._ready, []
        return ready
