"""Shared bits for the server tests: in-process servers, metrics parsing, SSE reading."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from dataclasses import dataclass

_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; raises on a malformed line."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) \S+ .+$", line) or not line, line
            continue
        m = _METRIC.match(line)
        assert m, f"malformed metrics line: {line!r}"
        values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return values


def sse_events(lines) -> list[object]:
    """Data payloads of an SSE stream ('[DONE]' kept as a string)."""
    events = []
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


@dataclass
class InProcessServer:
    """The production WSGI server (waitress) for a Flask app, in a background thread."""

    server: object
    url: str
    _stop: threading.Event
    _thread: threading.Thread

    @classmethod
    def start(cls, app, threads: int = 48, max_body_bytes: int = 4 << 20) -> InProcessServer:
        from dstp.server import make_wsgi_server, pump_once

        server = make_wsgi_server(app, "127.0.0.1", 0, threads, max_body_bytes)
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                pump_once(server, 0.05)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return cls(server, f"http://127.0.0.1:{server.effective_port}", stop, thread)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def get_json(url: str, timeout: float = 10.0) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")
