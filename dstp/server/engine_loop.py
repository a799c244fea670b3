"""``EngineLoop``: the HTTP rank's engine loop; HTTP threads reach it through queues.

The engine is not thread-safe and every ``step()`` is a collective over all ranks, so one
thread calls it (a :class:`~dstp.engine.loop.StepLoop`). A watchdog fails every request and
stops the server when an engine call overruns its :class:`~dstp.engine.loop.Liveness`
deadline (a hung or dead rank), so the launcher ends the job instead of leaving it hanging.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dstp.engine.loop import Liveness, StepLoop
from dstp.engine.outputs import RequestOutput
from dstp.engine.protocol import EngineClient
from dstp.engine.sampling_params import InvalidRequest, SamplingParams
from dstp.server.metrics import FinishedRequest, ServerMetrics
from dstp.server.request_log import STATS_INTERVAL_S, StatsLogger, log_request

log = logging.getLogger("dstp")


class EngineUnavailable(RuntimeError):
    """The engine is stopping, failed, or not ready: the request cannot be served (503)."""


class QueueFull(RuntimeError):
    """Too many requests in flight: the client should retry later (429)."""


class RequestFailed(RuntimeError):
    """An admitted request ended without a result (server stopping or a rank died)."""


# -- requests -------------------------------------------------------------------------------
@dataclass(eq=False)
class RequestHandle:
    """One request's bookkeeping on the loop thread; its outputs go to its group's stream."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: queue.Queue  # (slot, output | exception | _END), shared by the group
    slot: int = 0
    accepted: threading.Event = field(default_factory=threading.Event)
    reject: BaseException | None = None
    submit_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None  # start of the first step that ran it
    first_token_time: float | None = None
    last_token_time: float | None = None
    output_tokens: int = 0  # so far, over every choice
    done: bool = False  # the final output (or error) is queued

    def put(self, item: object) -> None:
        self.stream.put((self.slot, item))


_END = object()  # on a stream: the request was aborted, nothing more comes


class RequestGroup:
    """The requests of one HTTP request (one prompt, or a /v1/completions prompt list);
    their outputs arrive on one stream as (slot, output)."""

    def __init__(
        self, handles: list[RequestHandle], stream: queue.Queue, abort: Callable[[str], None]
    ) -> None:
        self.handles, self._stream, self._abort = handles, stream, abort

    @property
    def request_id(self) -> str:
        return self.handles[0].request_id

    def outputs(
        self,
        poll_s: float = 0.25,
        disconnected: Callable[[], bool] | None = None,
        idle_s: float | None = None,
    ) -> Iterator[tuple[int, RequestOutput | None]]:
        """Yield (slot, output) until every member's final output; abort the unfinished
        members if the client goes away or the consumer stops early. Raises
        ``RequestFailed`` when the engine failed or is shutting down. With ``idle_s``, also
        (-1, None) after each ``idle_s`` without an output (a stream's keep-alive)."""
        pending = set(range(len(self.handles)))
        next_check = time.monotonic() + poll_s
        last = time.monotonic()
        try:
            while pending:
                try:
                    slot, item = self._stream.get(timeout=poll_s)
                    last = time.monotonic()
                except queue.Empty:
                    slot, item = None, None
                    if idle_s is not None and time.monotonic() - last >= idle_s:
                        last = time.monotonic()
                        yield -1, None
                if disconnected is not None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + poll_s
                    if disconnected():
                        log.info("client of %s disconnected: aborting", self.request_id)
                        return
                if item is None:
                    continue
                if item is _END or isinstance(item, BaseException) or item.finished:
                    pending.discard(slot)
                if item is _END:  # aborted: nobody waits for the rest
                    return
                if isinstance(item, BaseException):
                    raise item
                yield slot, item
        finally:
            for slot in pending:
                self._abort(self.handles[slot].request_id)

    def result(self, disconnected: Callable[[], bool] | None = None) -> list[RequestOutput] | None:
        """Every member's final output, by slot (None if the client went away first)."""
        last = dict(self.outputs(disconnected=disconnected))
        done = [last.get(i) for i in range(len(self.handles))]
        return done if all(o is not None and o.finished for o in done) else None


@dataclass(frozen=True)
class _Add:
    handles: list[RequestHandle]


@dataclass(frozen=True)
class _Abort:
    request_id: str


_WAKE = object()  # sent by stop(): the loop wakes and ends


# -- the HTTP rank's loop -------------------------------------------------------------------
class EngineLoop(StepLoop):
    """Runs the engine on a dedicated thread; the thread-safe front HTTP handlers call."""

    def __init__(
        self,
        engine: EngineClient,
        *,
        max_queued_requests: int = 256,
        heartbeat_interval_s: float = 1.0,
        heartbeat_timeout_s: float = 30.0,
        step_timeout_s: float = 600.0,
        metrics: ServerMetrics | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        log_requests: bool = False,
        stats_interval_s: float = STATS_INTERVAL_S,
    ) -> None:
        super().__init__(
            engine, Liveness(heartbeat_timeout_s, step_timeout_s), heartbeat_interval_s
        )
        self.max_queued_requests = max_queued_requests
        self.metrics = metrics or ServerMetrics()
        self.on_fatal = on_fatal
        self.log_requests = log_requests  # --enable-log-requests: one line per request
        self._stats_log = StatsLogger(stats_interval_s)
        self._commands: queue.Queue = queue.Queue()
        self._handles: dict[str, RequestHandle] = {}  # owned by the loop thread
        self._lock = threading.Lock()
        self._in_flight = 0  # submitted and not yet finished (guarded by _lock)
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._stop_reason = "server shutting down"
        self._ready = threading.Event()
        self.failure: BaseException | None = None
        self._failure_id = ""  # the id the log and the 503 bodies share, once failed
        self._stats: dict = {}
        self._thread = threading.Thread(target=self._run, name="dstp-engine", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="dstp-watchdog", daemon=True)

    # -- lifecycle -------------------------------------------------------------
    def start(self, ready_timeout_s: float = 120.0) -> None:
        """Start the loop and wait for a first heartbeat over all ranks."""
        self._thread.start()
        self._watchdog.start()
        if not self._ready.wait(ready_timeout_s) and self.failure is None:
            raise EngineUnavailable(f"engine not ready after {ready_timeout_s:.0f} s")
        if self.failure is not None:
            raise EngineUnavailable(f"engine failed at start: {self.failure}") from self.failure

    def stop(self, reason: str = "server shutting down", timeout_s: float = 30.0) -> None:
        """Fail in-flight requests with ``reason``, release the followers, join."""
        self._stopping.set()
        self._stop_reason = reason
        self._commands.put(_WAKE)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def healthy(self) -> bool:
        return self._ready.is_set() and self.failure is None and not self._stopping.is_set()

    @property
    def recovering(self) -> bool:
        """Whether a supervised engine is restarting its ranks (requests wait, not fail)."""
        return bool(getattr(self.engine, "recovering", False))

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def stats(self) -> dict:
        """The engine's stats after the last step or heartbeat."""
        return dict(self._stats)

    # -- HTTP side -------------------------------------------------------------
    def submit_many(
        self,
        prompts: list[tuple[list[int], SamplingParams]],
        accept_timeout_s: float = 120.0,
        id_prefix: str = "",
    ) -> RequestGroup:
        """Queue requests (added together, so they share batches) and wait until the engine
        admitted them. Raises ``InvalidRequest`` (400), ``QueueFull`` (429) or
        ``EngineUnavailable`` (503); when one is rejected, the others are aborted.
        ``id_prefix`` starts the request id (``chatcmpl-``: the id the client sees is the one
        the logs name)."""
        stream: queue.Queue = queue.Queue()
        base = f"{id_prefix}{uuid.uuid4().hex[:16]}-{next(self._ids)}"
        handles = [
            RequestHandle(base if i == 0 else f"{base}-{i}", list(ids), params, stream, i)
            for i, (ids, params) in enumerate(prompts)
        ]
        self._reserve(len(handles))
        self._commands.put(_Add(handles))
        self._await_admission(handles, accept_timeout_s)
        return RequestGroup(handles, stream, self.abort)

    def _reserve(self, k: int) -> None:
        if not self.healthy:
            raise EngineUnavailable(self._unavailable_reason())
        if k > self.max_queued_requests:
            raise InvalidRequest(
                f"{k} prompts in one request exceed the server's admission limit "
                f"({self.max_queued_requests} requests in flight)",
                param="prompt",
            )
        with self._lock:
            if self._in_flight + k > self.max_queued_requests:
                raise QueueFull(
                    f"server busy: {self._in_flight} requests in flight "
                    f"(limit {self.max_queued_requests}); retry later"
                )
            self._in_flight += k

    def _await_admission(self, handles: list[RequestHandle], accept_timeout_s: float) -> None:
        deadline = time.monotonic() + accept_timeout_s
        for handle in handles:
            while not handle.accepted.wait(0.25):
                if self.failure is not None or not self._thread.is_alive():
                    raise EngineUnavailable(self._unavailable_reason())
                if time.monotonic() > deadline:
                    for h in handles:
                        self.abort(h.request_id)
                    raise EngineUnavailable("engine did not accept the request in time")
        rejected = next((h.reject for h in handles if h.reject is not None), None)
        if rejected is not None:
            for h in handles:
                if h.reject is None:
                    self.abort(h.request_id)
            raise rejected

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def _unavailable_reason(self) -> str:
        if self.failure is not None:
            return self._failure_message()
        if self._stopping.is_set():
            return "server is shutting down"
        return "engine is not ready yet"

    # -- the loop thread ---------------------------------------------------------
    def _run(self) -> None:
        try:
            self._bind_device()
            self.liveness.timed("heartbeat", self.engine.heartbeat)
            self._snapshot()
            self._ready.set()
            log.info("engine loop ready: every rank answered the first heartbeat")
            if not self._stopping.is_set():
                self.run_steps()
        except BaseException as exc:  # the shared forward or a collective failed: fail fast
            if self._stopping.is_set():
                log.info("engine loop ended while stopping: %s", exc)
            else:
                self._fail(exc, "an engine step or heartbeat raised (shared forward or collective)")
                return
        self._finish_stop()

    def _bind_device(self) -> None:
        """This thread runs every step: on its rank's GPU, not the thread default cuda:0."""
        device = getattr(self.engine.tp, "device", None)
        if device is not None:
            from dstp.distributed import bind_thread_device

            bind_thread_device(device)

    def take(self, timeout_s: float) -> list[Any]:
        commands: list[Any] = []
        with contextlib.suppress(queue.Empty):
            commands.append(self._commands.get(block=timeout_s > 0, timeout=timeout_s))
            while True:
                commands.append(self._commands.get_nowait())
        return commands

    def apply(self, command: Any) -> bool:
        if isinstance(command, _Add):
            for handle in command.handles:
                self._add(handle)
        elif isinstance(command, _Abort):
            self._abort(command.request_id)
        return not self._stopping.is_set()

    def stepped(self, outputs: list[RequestOutput], started: float) -> None:
        self._mark_scheduled(started)
        self._dispatch(outputs, started)
        self._snapshot()

    def beat(self) -> None:
        self._snapshot()

    def _add(self, handle: RequestHandle) -> None:
        try:
            self.engine.add_request(handle.request_id, handle.prompt_token_ids, handle.params)
        except Exception as exc:  # not InvalidRequest: a bug for this request only (500)
            if not isinstance(exc, InvalidRequest):
                log.exception("add_request failed for %s", handle.request_id)
            handle.reject = exc
            self._release()
        else:
            handle.submit_time = time.monotonic()
            self._handles[handle.request_id] = handle
        handle.accepted.set()

    def _abort(self, request_id: str) -> None:
        handle = self._handles.pop(request_id, None)
        if handle is None:
            return  # already finished (or never admitted)
        self.engine.abort(request_id)
        self._end(handle, "aborted", _END)

    def _mark_scheduled(self, step_started: float) -> None:
        """Note when each request first ran (its queue time ends); a request the engine
        does not list as running gets it at its first output."""
        for request_id in self.engine.running_request_ids():
            handle = self._handles.get(request_id)
            if handle is not None and handle.scheduled_time is None:
                handle.scheduled_time = step_started

    def _dispatch(self, outputs: list[RequestOutput], step_started: float) -> None:
        now = time.monotonic()
        for out in outputs:
            handle = self._handles.get(out.request_id)
            if handle is None:
                continue  # aborted by its client: nobody is listening
            self._observe_tokens(handle, out, step_started, now)
            handle.output_tokens = sum(len(c.token_ids) for c in out.outputs)
            handle.put(out)
            if out.finished:
                reasons = [c.finish_reason or "abort" for c in out.outputs]
                status = "error" if "error" in reasons else "ok"
                status = "aborted" if status == "ok" and "abort" in reasons else status
                self._finished(handle, reasons, status, now)
                del self._handles[out.request_id]
                self._close(handle, None)

    def _observe_tokens(
        self, handle: RequestHandle, out: RequestOutput, step_started: float, now: float
    ) -> None:
        new = sum(len(c.new_token_ids) for c in out.outputs)
        if not new:
            return
        if handle.scheduled_time is None:
            handle.scheduled_time = step_started
        if handle.first_token_time is None:
            handle.first_token_time = now
            self.metrics.observe_ttft(now - handle.submit_time)
            self.metrics.observe_prefilled(len(handle.prompt_token_ids))
            self.metrics.observe_tokens(new, None)
        else:
            self.metrics.observe_tokens(new, (now - handle.last_token_time) / new)
        handle.last_token_time = now

    def _finished(
        self, handle: RequestHandle, reasons: list[str], status: str, now: float | None = None
    ) -> None:
        """Per-request metrics and (with --enable-log-requests) its log line."""
        try:
            record = FinishedRequest(
                prompt_tokens=len(handle.prompt_token_ids),
                output_tokens=handle.output_tokens,
                n=handle.params.n,
                max_tokens=handle.params.max_tokens,
                finished_reasons=reasons,
                arrival=handle.submit_time,
                scheduled=handle.scheduled_time,
                first_token=handle.first_token_time,
                end=time.monotonic() if now is None else now,
            )
            if status != "failed":
                self.metrics.observe_finished(record)
            if self.log_requests:
                log_request(handle.request_id, record, status)
        except Exception:  # bookkeeping must never fail a request
            log.exception("recording the end of request %s failed", handle.request_id)

    def _end(self, handle: RequestHandle, status: str, last: object) -> None:
        """End a request the engine did not finish (aborted, or failed with the engine)."""
        if not handle.done:
            self._finished(handle, ["abort"] * handle.params.n, status)
        self._close(handle, last)

    def _close(self, handle: RequestHandle, last: object) -> None:
        if handle.done:
            return
        handle.done = True
        if last is not None:
            handle.put(last)
        self._release()

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _snapshot(self) -> None:
        try:
            self._stats = dict(self.engine.stats())
            m = self.metrics
            self._stats_log.maybe_log(self._stats, m.prompt_tokens, m.generation_tokens)
        except Exception:  # stats are best effort; never take the server down
            log.debug("engine.stats() failed", exc_info=True)

    def _watch(self) -> None:
        """Fail the server if one engine call (a collective) hangs: a rank is stuck."""
        while not self._stopping.is_set() and self.failure is None:
            why = self.liveness.overdue(self.liveness.current())
            if why is not None:
                self._fail(TimeoutError(why), "watchdog")
                return
            time.sleep(0.5)

    def _fail(self, exc: BaseException, where: str) -> None:
        """Fatal: every rank's state is suspect. Requests that fail alone never get here."""
        if self.failure is not None:
            return
        self.failure = exc
        # The client gets an id to quote, never the exception's text (the README's promise
        # for 500s, held for these 503s too): the log line carries both.
        self._failure_id = f"err-{uuid.uuid4().hex[:12]}"
        log.error(
            "engine failed (%s), error id %s: %r; failing in-flight requests and exiting",
            where,
            self._failure_id,
            exc,
            exc_info=exc if not isinstance(exc, TimeoutError) else None,
        )
        self._fail_all(RequestFailed(self._failure_message()))
        self._ready.set()  # wake start() if it is still waiting
        if self.on_fatal is not None:
            self.on_fatal(exc)

    def _failure_message(self) -> str:
        return (
            f"the engine failed (error id {self._failure_id}); "
            "the server log has the details and the server is stopping"
        )

    def _fail_all(self, error: RequestFailed) -> None:
        for handle in list(self._handles.values()):
            self._end(handle, "failed", error)
        self._handles.clear()
        for command in self.take(0):  # requests still in the command queue
            if isinstance(command, _Add):
                for handle in command.handles:
                    handle.reject = EngineUnavailable(str(error))
                    self._release()
                    handle.accepted.set()

    def _finish_stop(self) -> None:
        self._fail_all(RequestFailed(self._stop_reason))
        try:
            self.engine.shutdown()
        except Exception as exc:
            log.warning("engine.shutdown() failed (a rank already gone?): %s", exc)
        log.info("engine loop stopped")
