"""``EngineDriver``: one thread owns the engine; HTTP threads reach it through queues.

The engine is not thread-safe and every ``step()`` is a collective over all ranks, so
exactly one thread calls it. It heartbeats the ranks while idle and a watchdog bounds
each call, so a dead or hung rank fails every request and stops the server (the
launcher then ends the job) instead of leaving it hanging.
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

from dstp.engine.outputs import RequestOutput
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


_END = object()


@dataclass
class RequestHandle:
    """The HTTP side of one request: its outputs arrive on ``_outputs``."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    driver: EngineDriver
    _outputs: queue.Queue = field(default_factory=queue.Queue)
    _accepted: threading.Event = field(default_factory=threading.Event)
    _reject: BaseException | None = None
    submit_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None  # start of the first step that ran it
    first_token_time: float | None = None
    last_token_time: float | None = None
    output_tokens: int = 0  # so far, over every choice
    done: bool = False  # set on the driver thread once the final output (or error) is queued
    _sink: queue.Queue | None = None  # a RequestGroup's shared queue: (slot, item) go there
    _slot: int = 0

    def _put(self, item: object) -> None:
        if self._sink is not None:
            self._sink.put((self._slot, item))
        else:
            self._outputs.put(item)

    def outputs(
        self, poll_s: float = 0.25, disconnected: Callable[[], bool] | None = None
    ) -> Iterator[RequestOutput]:
        """Yield outputs until the final one; abort if the client goes away.

        Raises ``RequestFailed`` when the engine failed or is shutting down.
        """
        finished = False
        next_check = time.monotonic() + poll_s
        try:
            while True:
                try:
                    item = self._outputs.get(timeout=poll_s)
                except queue.Empty:
                    item = None
                if disconnected is not None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + poll_s
                    if disconnected():
                        log.info("client of %s disconnected: aborting", self.request_id)
                        return
                if item is None:
                    continue
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # consumer stopped early (disconnect, generator closed)
                self.abort()

    def result(self, disconnected: Callable[[], bool] | None = None) -> RequestOutput | None:
        """The final output (None if the client went away first)."""
        last = None
        for out in self.outputs(disconnected=disconnected):
            last = out
        return last if last is not None and last.finished else None

    def abort(self) -> None:
        self.driver.abort(self.request_id)


class RequestGroup:
    """Several requests submitted together (a /v1/completions prompt list); their outputs
    arrive on one queue as (slot, output), slot being the prompt's position."""

    def __init__(self, handles: list[RequestHandle], sink: queue.Queue) -> None:
        self.handles, self._sink = handles, sink

    @property
    def request_id(self) -> str:
        return self.handles[0].request_id

    def outputs(
        self, poll_s: float = 0.25, disconnected: Callable[[], bool] | None = None
    ) -> Iterator[tuple[int, RequestOutput]]:
        """Yield (slot, output) until every member's final output; abort the unfinished
        members if the client goes away or the consumer stops early. Raises like
        ``RequestHandle.outputs``."""
        pending = set(range(len(self.handles)))
        next_check = time.monotonic() + poll_s
        try:
            while pending:
                try:
                    slot, item = self._sink.get(timeout=poll_s)
                except queue.Empty:
                    slot, item = None, None
                if disconnected is not None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + poll_s
                    if disconnected():
                        log.info("client of %s disconnected: aborting", self.request_id)
                        return
                if item is None:
                    continue
                if item is _END:  # aborted: nobody waits for the rest
                    pending.discard(slot)
                    return
                if isinstance(item, BaseException):
                    pending.discard(slot)
                    raise item
                yield slot, item
                if item.finished:
                    pending.discard(slot)
        finally:
            for slot in pending:
                self.handles[slot].abort()

    def result(self, disconnected: Callable[[], bool] | None = None) -> list[RequestOutput] | None:
        """Every member's final output, by slot (None if the client went away first)."""
        last: dict[int, RequestOutput] = {}
        for slot, out in self.outputs(disconnected=disconnected):
            last[slot] = out
        done = [last.get(i) for i in range(len(self.handles))]
        return done if all(o is not None and o.finished for o in done) else None


class EngineDriver:
    """Runs the engine loop on a dedicated thread; thread-safe front for HTTP handlers."""

    def __init__(
        self,
        engine,
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
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.step_timeout_s = step_timeout_s
        self.metrics = metrics or ServerMetrics()
        self.on_fatal = on_fatal
        self.log_requests = log_requests  # --enable-log-requests: one line per request
        self._stats_log = StatsLogger(stats_interval_s)
        self._commands: queue.Queue = queue.Queue()
        self._handles: dict[str, RequestHandle] = {}  # owned by the driver thread
        self._lock = threading.Lock()
        self._in_flight = 0  # submitted and not yet finished (guarded by _lock)
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._stop_reason = "server shutting down"
        self._ready = threading.Event()
        self.failure: BaseException | None = None
        self._call: tuple[str, float, float] | None = None  # (what, started, deadline)
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
        self._commands.put(("wake", None))
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def healthy(self) -> bool:
        return self._ready.is_set() and self.failure is None and not self._stopping.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def stats(self) -> dict:
        """Last engine stats snapshot (taken on the driver thread after each step)."""
        return dict(self._stats)

    # -- HTTP side -------------------------------------------------------------
    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        accept_timeout_s: float = 120.0,
    ) -> RequestHandle:
        """Queue a request and wait until the engine admitted it into its queue.

        Raises ``InvalidRequest`` (400), ``QueueFull`` (429), ``EngineUnavailable`` (503).
        """
        rid = request_id or self._new_id()
        handle = RequestHandle(rid, list(prompt_token_ids), params, self)
        self._admit([handle], accept_timeout_s)
        return handle

    def submit_many(
        self, prompts: list[tuple[list[int], SamplingParams]], accept_timeout_s: float = 120.0
    ) -> RequestGroup:
        """Queue several requests at once (the engine adds them all before its next step,
        so they share batches); each counts against the admission limit. Raises as
        ``submit``; when one is rejected, the others are aborted."""
        sink: queue.Queue = queue.Queue()
        base = self._new_id()
        handles = [
            RequestHandle(
                base if i == 0 else f"{base}-{i}", list(ids), params, self, _sink=sink, _slot=i
            )
            for i, (ids, params) in enumerate(prompts)
        ]
        self._admit(handles, accept_timeout_s)
        return RequestGroup(handles, sink)

    def _new_id(self) -> str:
        return f"{uuid.uuid4().hex[:16]}-{next(self._ids)}"

    def _admit(self, handles: list[RequestHandle], accept_timeout_s: float) -> None:
        if not self.healthy:
            raise EngineUnavailable(self._unavailable_reason())
        k = len(handles)
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
        self._commands.put(("add", handles))
        deadline = time.monotonic() + accept_timeout_s
        for handle in handles:
            while not handle._accepted.wait(0.25):
                if self.failure is not None or not self._thread.is_alive():
                    raise EngineUnavailable(self._unavailable_reason())
                if time.monotonic() > deadline:
                    for h in handles:
                        self.abort(h.request_id)
                    raise EngineUnavailable("engine did not accept the request in time")
        rejected = next((h._reject for h in handles if h._reject is not None), None)
        if rejected is not None:
            for h in handles:
                if h._reject is None:
                    self.abort(h.request_id)
            raise rejected

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def _unavailable_reason(self) -> str:
        if self.failure is not None:
            return f"engine failed: {self.failure}"
        if self._stopping.is_set():
            return "server is shutting down"
        return "engine is not ready yet"

    # -- driver thread ---------------------------------------------------------
    def _run(self) -> None:
        try:
            self._timed("heartbeat", self.heartbeat_timeout_s, self.engine.heartbeat)
            self._snapshot()
            self._ready.set()
            log.info("engine driver ready: every rank answered the first heartbeat")
            while not self._stopping.is_set():
                self._drain_commands(block=not self.engine.has_unfinished())
                if self._stopping.is_set():
                    break
                if self.engine.has_unfinished():
                    started = time.monotonic()
                    outputs = self._timed("step", self.step_timeout_s, self.engine.step)
                    self._mark_scheduled(started)
                    self._dispatch(outputs, started)
                    self._snapshot()
        except BaseException as exc:  # the shared forward or a collective failed: fail fast
            if self._stopping.is_set():
                log.info("engine loop ended while stopping: %s", exc)
            else:
                self._fail(exc, "an engine step or heartbeat raised (shared forward or collective)")
                return
        self._finish_stop()

    def _drain_commands(self, block: bool) -> None:
        """Apply queued adds and aborts; when idle wait for one, heartbeating meanwhile."""
        deadline = time.monotonic() + self.heartbeat_interval_s
        while True:
            try:
                if block:
                    timeout = deadline - time.monotonic()
                    if timeout <= 0:
                        self._timed("heartbeat", self.heartbeat_timeout_s, self.engine.heartbeat)
                        self._snapshot()
                        deadline = time.monotonic() + self.heartbeat_interval_s
                        continue
                    kind, arg = self._commands.get(timeout=timeout)
                else:
                    kind, arg = self._commands.get_nowait()
            except queue.Empty:
                if block:
                    continue
                return
            if kind == "add":
                for handle in arg:
                    self._add(handle)
            elif kind == "abort":
                self._abort(arg)
            elif kind == "wake":
                return
            if block:  # got work: go step it, but take whatever else is queued first
                block = False

    def _add(self, handle: RequestHandle) -> None:
        try:
            self.engine.add_request(handle.request_id, handle.prompt_token_ids, handle.params)
        except InvalidRequest as exc:
            handle._reject = exc
        except Exception as exc:  # a bug for this request only: answer 500, keep serving
            log.exception("add_request failed for %s", handle.request_id)
            handle._reject = exc
        else:
            handle.submit_time = time.monotonic()
            self._handles[handle.request_id] = handle
            self.metrics.observe_prompt(len(handle.prompt_token_ids))
        if handle._reject is not None:
            self._release()
        handle._accepted.set()

    def _abort(self, request_id: str) -> None:
        handle = self._handles.pop(request_id, None)
        if handle is None:
            return  # already finished (or never admitted)
        with contextlib.suppress(KeyError):
            self.engine.abort(request_id)
        self._finished(handle, ["abort"] * handle.params.n, "aborted")
        self._close(handle, _END)

    def _mark_scheduled(self, step_started: float) -> None:
        """Note when each request first ran (its queue time ends), from the scheduler's
        running set (engines without one: at its first output)."""
        running = getattr(getattr(self.engine, "scheduler", None), "running", None) or ()
        for seq in running:
            request = getattr(seq, "request", None)
            handle = self._handles.get(getattr(request, "request_id", None))
            if handle is not None and handle.scheduled_time is None:
                handle.scheduled_time = step_started

    def _dispatch(self, outputs: list[RequestOutput], step_started: float | None = None) -> None:
        now = time.monotonic()
        for out in outputs:
            handle = self._handles.get(out.request_id)
            if handle is None:
                continue  # aborted by its client: nobody is listening
            new = sum(len(c.new_token_ids) for c in out.outputs)
            if new:
                if handle.scheduled_time is None:
                    handle.scheduled_time = step_started if step_started is not None else now
                if handle.first_token_time is None:
                    handle.first_token_time = now
                    self.metrics.observe_ttft(now - handle.submit_time)
                    self.metrics.observe_prefilled(len(handle.prompt_token_ids))
                    self.metrics.observe_tokens(new, None)
                else:
                    self.metrics.observe_tokens(new, (now - handle.last_token_time) / new)
                handle.last_token_time = now
            handle.output_tokens = sum(len(c.token_ids) for c in out.outputs)
            handle._put(out)
            if out.finished:
                reasons = [c.finish_reason or "abort" for c in out.outputs]
                status = "error" if "error" in reasons else "ok"
                status = "aborted" if status == "ok" and "abort" in reasons else status
                self._finished(handle, reasons, status, now)
                del self._handles[out.request_id]
                self._close(handle, None)

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

    def _close(self, handle: RequestHandle, last: object) -> None:
        if handle.done:
            return
        handle.done = True
        if last is not None:
            handle._put(last)
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

    def _timed(self, what: str, timeout_s: float, fn: Callable):
        start = time.monotonic()
        self._call = (what, start, start + timeout_s)
        try:
            return fn()
        finally:
            self._call = None

    def _watch(self) -> None:
        """Fail the server if one engine call (a collective) hangs: a rank is stuck."""
        while not self._stopping.is_set() and self.failure is None:
            call = self._call
            if call is not None and time.monotonic() > call[2]:
                what, started, _ = call
                self._fail(
                    TimeoutError(
                        f"engine {what} did not return within {call[2] - started:.0f} s: "
                        "a rank is hung or unreachable"
                    ),
                    "watchdog",
                )
                return
            time.sleep(0.5)

    def _fail(self, exc: BaseException, where: str) -> None:
        """Fatal: every rank's state is suspect. Requests that fail alone never get here."""
        if self.failure is not None:
            return
        self.failure = exc
        log.error(
            "engine failed (%s): %r; failing in-flight requests and exiting",
            where,
            exc,
            exc_info=exc if not isinstance(exc, TimeoutError) else None,
        )
        self._fail_all(RequestFailed(f"engine failed: {exc}"))
        self._ready.set()  # wake start() if it is still waiting
        if self.on_fatal is not None:
            self.on_fatal(exc)

    def _fail_all(self, error: RequestFailed) -> None:
        for handle in list(self._handles.values()):
            if not handle.done:
                self._finished(handle, ["abort"] * handle.params.n, "failed")
            self._close(handle, error)
        self._handles.clear()
        while True:  # requests still in the command queue
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                for handle in arg:
                    handle._reject = EngineUnavailable(str(error))
                    self._release()
                    handle._accepted.set()

    def _finish_stop(self) -> None:
        reason = self._stop_reason
        self._fail_all(RequestFailed(reason))
        try:
            self.engine.shutdown()
        except Exception as exc:
            log.warning("engine.shutdown() failed (a rank already gone?): %s", exc)
        log.info("engine driver stopped")
