"""The HTTP layer under pressure, on the production WSGI server with the fake engine.

The admission limit (``--max-queued-requests``) is what bounds work: beyond it a request
gets 429 + Retry-After at once, while /health and /metrics answer in well under a second
although every admitted request is a slow stream. Slow clients (bytes trickled, or
nothing sent) are disconnected within the read deadline, and long streams are not.
The same pressure against the real engine is in test_server_e2e.py.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests

from dstp.model.default_model import build_tokenizer
from dstp.server.app import create_app
from dstp.server.engine_loop import EngineLoop
from dstp.server.limits import http_threads
from dstp.server.serving import ServerConfig
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server_helpers import InProcessServer, parse_metrics, sse_events, wait_until

LIMIT = 4  # admission limit of the pressure server
FAST_S = 1.0  # /health and /metrics must answer within this, however busy


def _serve(engine, max_queued: int, threads: int | None = None, **limits):
    loop = EngineLoop(engine, heartbeat_interval_s=0.2, max_queued_requests=max_queued)
    loop.start()
    cfg = ServerConfig(
        model_name="fake-model", max_model_len=engine.max_model_len, vocab_size=engine.vocab_size
    )
    app = create_app(loop, engine.tokenizer, cfg)
    server = InProcessServer.start(app, threads=threads or http_threads(max_queued), **limits)
    return loop, server


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _open_stream(url: str, max_tokens: int = 250) -> socket.socket:
    """A streaming completion that is under way (first event read); the caller closes it."""
    body = json.dumps(
        {"prompt": "slow", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    ).encode()
    sock = _connect(url)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    got = b""
    while b"data: " not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    return sock


def _timed_get(url: str) -> tuple[int, float]:
    t0 = time.monotonic()
    resp = requests.get(url, timeout=10)
    return resp.status_code, time.monotonic() - t0


def test_admission_limit_bounds_work_and_health_stays_fast():
    engine = FakeEngine(build_tokenizer(), step_delay_s=0.05)  # 250 tokens: a 12 s stream
    loop, server = _serve(engine, LIMIT)
    url = server.url
    streams = []
    try:
        streams = [_open_stream(url) for _ in range(LIMIT)]
        assert wait_until(lambda: loop.num_in_flight == LIMIT, 5)

        def post(_i):
            t0 = time.monotonic()
            resp = requests.post(
                f"{url}/v1/completions", json={"prompt": "more", "max_tokens": 4}, timeout=10
            )
            return resp, time.monotonic() - t0

        # more at once than the spare threads, while /health and /metrics are polled
        with ThreadPoolExecutor(24) as pool:
            rejected = [pool.submit(post, i) for i in range(24)]
            probes = [
                pool.submit(_timed_get, f"{url}/{path}")
                for _ in range(4)
                for path in ("health", "metrics")
            ]
            rejected = [f.result() for f in rejected]
            probes = [f.result() for f in probes]
        for resp, elapsed in rejected:
            assert resp.status_code == 429, resp.text
            assert int(resp.headers["Retry-After"]) >= 1
            assert resp.json()["error"]["code"] == "queue_full"
            assert elapsed < FAST_S, f"a 429 took {elapsed:.2f} s"
        assert all(status == 200 and s < FAST_S for status, s in probes), probes
        for _ in range(5):  # and on their own
            for path in ("health", "metrics", "v1/models"):
                status, elapsed = _timed_get(f"{url}/{path}")
                assert status == 200 and elapsed < FAST_S, (path, elapsed)
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).completions.create(
                model="fake-model", prompt="x", max_tokens=2
            )
        for kind in ("chat/completions", "generate"):  # every generation endpoint
            body = (
                {"messages": [{"role": "user", "content": "x"}]}
                if kind.startswith("chat")
                else {"prompt_token_ids": [5]}
            )
            path = f"/v1/{kind}" if kind.startswith("chat") else f"/{kind}"
            assert requests.post(f"{url}{path}", json=body, timeout=10).status_code == 429
        streams[0].settimeout(5)
        assert b"data: " in streams[0].recv(65536)  # the admitted streams keep going
        metrics = parse_metrics(requests.get(f"{url}/metrics", timeout=5).text)
        assert metrics["dstp:num_requests_in_flight"] == LIMIT
        assert (
            metrics['http_requests_total{handler="/v1/completions",method="POST",status="429"}']
            >= 25
        )
        assert engine.num_steps < 250  # all of that while the first streams still ran
    finally:
        for sock in streams:
            sock.close()
        assert wait_until(lambda: loop.num_in_flight == 0, 10)
        assert engine.free_blocks == engine.num_blocks
        loop.stop()
        server.close()


def test_fast_lane_answers_when_every_request_thread_is_busy():
    """/health, /metrics, /v1/models have threads of their own: with the request pool
    exhausted (here 2 threads, both streaming) they still answer at once."""
    engine = FakeEngine(build_tokenizer(), step_delay_s=0.05)
    loop, server = _serve(engine, max_queued=8, threads=2)
    streams = []
    try:
        streams = [_open_stream(server.url) for _ in range(2)]
        for _ in range(3):
            for path in ("health", "metrics", "v1/models"):
                status, elapsed = _timed_get(f"{server.url}/{path}")
                assert status == 200 and elapsed < FAST_S, (path, elapsed)
    finally:
        for sock in streams:
            sock.close()
        assert wait_until(lambda: loop.num_in_flight == 0, 10)
        loop.stop()
        server.close()


def _closed(sock: socket.socket, wait_s: float = 0.05) -> bool:
    """Whether the server has closed ``sock`` (it sends nothing before doing so)."""
    sock.settimeout(wait_s)
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def test_slow_clients_are_disconnected_within_the_read_deadline():
    """Headers trickled, a body trickled, nothing at all: each connection is closed within
    the deadline (1 s here, 30 s by default) plus the 1 s sweep, and no sooner. A stream
    that outlasts both deadlines, and a client a little slow but in time, are served."""
    read_s = 1.0
    engine = FakeEngine(build_tokenizer(), step_delay_s=0.02)
    loop, server = _serve(engine, 8, request_read_timeout_s=read_s, idle_timeout_s=1)
    url = server.url
    try:
        with ThreadPoolExecutor(1) as pool:
            long_stream = pool.submit(  # 150 steps of 20 ms: 3 s, past both timeouts
                requests.post,
                f"{url}/v1/completions",
                json={"prompt": "long", "max_tokens": 150, "ignore_eos": True, "stream": True},
                timeout=30,
            )
            header = _connect(url)
            header.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            body = _connect(url)
            body.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 4096\r\n\r\n{"
            )
            idle = _connect(url)
            t0 = time.monotonic()
            open_socks = {"header": header, "body": body, "idle": idle}
            closed_after: dict[str, float] = {}
            while open_socks and time.monotonic() - t0 < read_s + 6:
                for name, sock in list(open_socks.items()):
                    try:
                        if name != "idle":
                            sock.sendall(
                                b"a"
                            )  # one byte per ~0.1 s keeps waitress's idle timer fresh
                        gone = _closed(sock)
                    except OSError:
                        gone = True
                    if gone:
                        closed_after[name] = time.monotonic() - t0
                        sock.close()
                        del open_socks[name]
                time.sleep(0.05)
            for sock in open_socks.values():
                sock.close()
            assert set(closed_after) == {"header", "body", "idle"}, closed_after
            for name, elapsed in closed_after.items():
                assert read_s * 0.9 < elapsed < read_s + 2.5, (name, elapsed)

            # a little slow but within the deadline: served
            data = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
            sock = _connect(url)
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data[:5]
            )
            time.sleep(0.4)
            sock.sendall(data[5:])
            sock.settimeout(10)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            sock.close()
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]

            resp = long_stream.result()
            events = sse_events(resp.iter_lines())
            assert events[-1] == "[DONE]" and len(events) > 100
    finally:
        loop.stop()
        server.close()


def test_thread_pool_is_sized_from_the_admission_limit():
    from dstp.server import cli, limits

    # the flags' help and docs/serving.md (where the how lives) quote the server's numbers
    docs = (Path(__file__).parents[2] / "docs" / "serving.md").read_text()
    help_text = " ".join((cli.build_parser().format_help() + docs).split())
    for number in (
        f"+ {limits.RESERVE_THREADS}",
        f"have {limits.FAST_THREADS} threads",
        f"after {limits.IDLE_TIMEOUT_S} s",
        f"up to {limits.DRAIN_MAX_BYTES >> 20} MiB",
    ):
        assert number in help_text, number
    parser = cli.build_parser()

    def sized(*argv):
        args = parser.parse_args(list(argv))
        ok = cli.size_http_pool(args, warn=False)
        return ok and (args.http_threads, args.max_queued_requests)

    assert parser.parse_args([]).request_read_timeout == limits.REQUEST_READ_TIMEOUT_S
    assert sized() == (limits.http_threads(256), 256) == (272, 256)
    assert sized("--max-queued-requests", "32") == (48, 32)
    assert sized("--http-threads", "64") == (64, 48)  # the limit follows a smaller pool
    assert sized("--http-threads", "400") == (400, 256)
    assert sized("--http-threads", "16") is False
    assert sized("--max-queued-requests", "0") is False
