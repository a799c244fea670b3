"""waitress, adapted to serve the app on rank 0: a fast lane for health checks, a
deadline for reading a request, a 413 only after the body is drained, and every error
as OpenAI JSON. The limits and why they are what they are: ``limits.py``.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher
from waitress.utilities import Error as WaitressError

from dstp.server.limits import (
    DRAIN_MAX_BYTES,
    FAST_PATHS,
    FAST_THREADS,
    IDLE_TIMEOUT_S,
    MAX_HEADER_BYTES,
    RECV_BYTES,
    REQUEST_READ_TIMEOUT_S,
    connection_limit,
)
from dstp.server.protocol import APIError

log = logging.getLogger("dstp")


class LazyApp:
    """WSGI entry point: 503 until the real app is set, and a count of open responses.

    The port binds before the model loads (a taken port fails fast), and the
    count lets shutdown wait until every in-flight response has been written.
    """

    def __init__(self) -> None:
        self.app = None
        self._lock = threading.Lock()
        self.active = 0

    def __call__(self, environ, start_response):
        if self.app is None:
            body = json.dumps(
                {"error": {"message": "the model is loading", "type": "service_unavailable"}}
            ).encode()
            start_response(
                "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Retry-After", "5")],
            )
            return [body]
        with self._lock:
            self.active += 1
        try:
            result = self.app(environ, start_response)
        except BaseException:
            self._done()
            raise
        return _Closing(result, self._done)

    def _done(self) -> None:
        with self._lock:
            self.active -= 1


class _Closing:
    """Iterate a WSGI response and call ``on_close`` exactly once when the server closes it."""

    def __init__(self, inner, on_close: Callable[[], None]) -> None:
        self._inner = inner
        self._on_close = on_close

    def __iter__(self):
        return iter(self._inner)

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


class _HTTPError(WaitressError):
    """An error waitress answers before the app sees the request (see ``_JSONErrorTask``)."""

    def __init__(self, code: int, reason: str, message: str, error_code: str | None) -> None:
        super().__init__(message)
        self.code, self.reason, self.error_code = code, reason, error_code


def _body_too_large(limit: int) -> _HTTPError:
    message = f"request body exceeds the {limit}-byte limit"
    return _HTTPError(413, "Request Entity Too Large", message, "body_too_large")


class _DiscardBuffer:
    """Stands in for waitress's body buffer while an oversized body is read: keeps nothing."""

    def __init__(self, size: int) -> None:
        self.size = size

    def append(self, data: bytes) -> None:
        self.size += len(data)

    def __len__(self) -> int:
        return self.size

    def getfile(self):
        return io.BytesIO()

    def close(self) -> None:
        pass


class _RequestParser(HTTPRequestParser):
    """waitress's parser, plus: when its first byte came (for the read deadline), and a
    body over ``max_body_bytes`` read to its end and dropped, then answered 413."""

    max_body_bytes = 4 * 1024 * 1024  # set per server (make_wsgi_server)

    def __init__(self, adj) -> None:
        super().__init__(adj)
        self.started = time.monotonic()
        self._dropping = False

    def received(self, data: bytes) -> int:
        had_headers = self.headers_finished
        consumed = super().received(data)
        if self.error is not None or self._dropping or self.completed:
            return consumed  # waitress's own errors (past DRAIN_MAX_BYTES too) stay as they are
        if not had_headers and self.headers_finished:
            if self.content_length > self.max_body_bytes:
                self._drop_body()
        elif self.body_rcv is not None and len(self.body_rcv) > self.max_body_bytes:
            self._drop_body()  # chunked: the size shows as it arrives
        return consumed

    def _drop_body(self) -> None:
        self.error = _body_too_large(self.max_body_bytes)
        if self.expect_continue:  # "Expect: 100-continue" not answered yet: the body is held
            self.expect_continue = False  # back, so answer now (and send no 100 Continue)
            self.completed = True
            return
        rcv = self.body_rcv
        kept, rcv.buf = rcv.buf, _DiscardBuffer(len(rcv.buf))
        kept.close()
        self._dropping = True  # completed (then answered) when the body has all arrived


class _JSONErrorTask(ErrorTask):
    """waitress's own error answers (413, 431, malformed request 400, 500) as OpenAI JSON."""

    def execute(self) -> None:
        err = self.request.error
        code = getattr(err, "error_code", None)
        message = err.body
        if err.code == 413 and code is None:  # waitress's backstop, past DRAIN_MAX_BYTES
            err = _body_too_large(self.channel.server.max_body_bytes)
            code, message = err.error_code, err.body
        kind = "server_error" if err.code >= 500 else "invalid_request_error"
        body = json.dumps(APIError(err.code, message, type=kind, code=code).body()).encode()
        self.status = f"{err.code} {err.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    parser_class = _RequestParser  # per server: a subclass with its max_body_bytes
    error_task_class = _JSONErrorTask


class WSGIServer(TcpWSGIServer):
    """waitress's TCP server with a fast lane, a request-read deadline and JSON errors."""

    def __init__(self, app, adj: Adjustments, max_body_bytes: int, read_timeout_s: float) -> None:
        self.max_body_bytes = max_body_bytes
        self.request_read_timeout_s = read_timeout_s
        parser = type("RequestParser", (_RequestParser,), {"max_body_bytes": max_body_bytes})
        self.channel_class = type("Channel", (_Channel,), {"parser_class": parser})
        self.socket_map: dict = {}  # what pump_once drives
        self.fast_dispatcher = ThreadedTaskDispatcher()
        super().__init__(app, self.socket_map, dispatcher=ThreadedTaskDispatcher(), adj=adj)
        # threads only once the port is bound (a taken port raises above, leaving none)
        self.task_dispatcher.set_thread_count(adj.threads)
        self.fast_dispatcher.set_thread_count(FAST_THREADS)

    def add_task(self, channel) -> None:
        """Called (event loop or a worker) when a channel has a complete request to serve."""
        req = channel.requests[0] if channel.requests else None
        fast = req is not None and (
            req.error is not None or (req.command in ("GET", "HEAD") and req.path in FAST_PATHS)
        )
        (self.fast_dispatcher if fast else self.task_dispatcher).add_task(channel)

    def maintenance(self, now: float) -> None:
        """Every ``cleanup_interval`` s on the event loop: close idle connections (waitress)
        and connections whose request has been arriving for too long (ours)."""
        super().maintenance(now)
        mono = time.monotonic()
        for channel in list(self.active_channels.values()):
            req = channel.request  # a request still being received
            if req is None or req.completed or channel.will_close:
                continue
            if channel.requests:  # still answering the one before: not the client's delay
                req.started = mono
            elif mono - getattr(req, "started", mono) > self.request_read_timeout_s:
                log.info(
                    "closing the connection from %s: its request did not arrive within %.0f s",
                    channel.addr[0] if channel.addr else "?",
                    self.request_read_timeout_s,
                )
                channel.will_close = True  # the loop closes it on its next pass

    def close(self) -> None:
        super().close()
        for dispatcher in (self.task_dispatcher, self.fast_dispatcher):
            dispatcher.set_thread_count(0)  # idle threads exit, busy ones after their task


def make_wsgi_server(
    app,
    host: str,
    port: int,
    threads: int,
    max_body_bytes: int,
    *,
    request_read_timeout_s: float = REQUEST_READ_TIMEOUT_S,
    idle_timeout_s: int = IDLE_TIMEOUT_S,
) -> WSGIServer:
    """A waitress server bound now (fails fast if the port is taken); ``pump_once`` serves.

    ``threads`` serve requests; size it with ``http_threads(admission limit)``.
    """
    adj = Adjustments(
        host=host,
        port=port,
        threads=threads,
        connection_limit=connection_limit(threads),
        channel_timeout=idle_timeout_s,
        cleanup_interval=1,  # how often maintenance() runs, so deadlines hold within ~1 s
        max_request_header_size=MAX_HEADER_BYTES,
        max_request_body_size=max(DRAIN_MAX_BYTES, max_body_bytes + 1),
        recv_bytes=RECV_BYTES,
        channel_request_lookahead=1,  # lets handlers see a client that hung up
        asyncore_use_poll=True,  # select() fails on descriptors >= 1024
        ident="dstp",
        clear_untrusted_proxy_headers=True,
    )
    return WSGIServer(app, adj, max_body_bytes, request_read_timeout_s)


def pump_once(server, timeout_s: float = 0.2) -> None:
    """One slice of waitress's event loop (it does the socket I/O for every response)."""
    wasyncore.loop(timeout=timeout_s, map=server.socket_map, count=1, use_poll=True)
