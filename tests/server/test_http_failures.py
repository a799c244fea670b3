"""Concurrency and failures: many clients at once, a rank dying, a hung rank, stopping.

The real EngineLoop, Flask app and waitress server run in-process with a deterministic
fake engine (tests/helpers/fake_engine.py), so these are fast and exact; the fixtures
``main`` and ``strict`` are in conftest.py. The real engine behind the same server:
test_server_e2e.py.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from dstp.engine.sampling_params import SamplingParams
from dstp.model.default_model import build_tokenizer
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server_helpers import (
    parse_metrics,
    serve_fake,
    sse_events,
    wait_until,
)
from tests.server.test_http_validation import BAD_COMPLETIONS  # the same invalid bodies


# -- concurrency ----------------------------------------------------------------------
def test_many_concurrent_clients_mixed(main):
    """40 clients at once, a third of them invalid; each valid one answered exactly and once."""
    engine, loop, url = main
    engine.step_delay_s = 0.002
    rng = random.Random(0)
    jobs = []
    for i in range(40):
        kind = i % 3
        if kind == 2:
            jobs.append(("bad", rng.choice([b for b, _ in BAD_COMPLETIONS])))
        else:
            prompt = [rng.randrange(3, 200) for _ in range(rng.randrange(1, 30))]
            jobs.append(
                ("ok", {"prompt": prompt, "max_tokens": rng.randrange(1, 20), "stream": kind == 1})
            )

    def run(job):
        kind, body = job
        resp = requests.post(
            f"{url}/v1/completions", json=body, stream=body.get("stream", False), timeout=60
        )
        if kind == "bad" or not body.get("stream"):
            return resp.status_code, resp.json()
        events = sse_events(resp.iter_lines())
        return resp.status_code, events

    try:
        with ThreadPoolExecutor(40) as pool:
            results = list(pool.map(run, jobs))
    finally:
        engine.step_delay_s = 0.0
    ids = set()
    for (kind, body), (status, payload) in zip(jobs, results, strict=True):
        if kind == "bad":
            assert 400 <= status < 500 and "error" in payload
            continue
        assert status == 200
        want, _, finish = engine.reference(
            body["prompt"], SamplingParams(max_tokens=body["max_tokens"])
        )[0]
        if body["stream"]:
            assert payload[-1] == "[DONE]"
            chunks = payload[:-1]
            assert "".join(c["choices"][0]["text"] for c in chunks) == want
            ids.add(chunks[0]["id"])
        else:
            assert payload["choices"][0]["text"] == want
            assert payload["choices"][0]["finish_reason"] == finish
            ids.add(payload["id"])
    assert len(ids) == sum(k == "ok" for k, _ in jobs)  # one answer per request
    assert wait_until(lambda: loop.num_in_flight == 0, 5)
    metrics = parse_metrics(requests.get(f"{url}/metrics", timeout=5).text)
    assert engine.free_blocks == engine.num_blocks  # no block leaked
    assert metrics["dstp:kv_cache_usage_perc"] == 0
    assert metrics["dstp:num_requests_in_flight"] == 0
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    assert len(engine.thread_ids) == 1  # only the engine loop thread ever touched the engine


# -- failures -------------------------------------------------------------------------
def test_engine_failure_errors_in_flight_and_health():
    """A rank 'dies' mid-stream: the stream gets an error event, /health 503, on_fatal runs."""
    engine = FakeEngine(build_tokenizer(), step_delay_s=0.02)
    fatal = []
    loop, server = serve_fake(engine, loop={"on_fatal": fatal.append})
    try:
        resp = requests.post(
            f"{server.url}/v1/completions",
            json={"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True},
            stream=True,
            timeout=10,
        )
        lines = resp.iter_lines()
        assert next(lines).startswith(b"data: ")
        engine.dead = "rank 1 is gone"
        events = sse_events(list(lines))
        message = events[-1]["error"]["message"]
        # an id to quote, never the exception's text (which only the log carries)
        assert "rank 1 is gone" not in message and "error id err-" in message
        assert wait_until(lambda: fatal, 5)
        health = requests.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        for body in ({"prompt": "x"}, {"prompt": "x", "stream": True}):
            resp = requests.post(f"{server.url}/v1/completions", json=body, timeout=5)
            assert resp.status_code == 503 and resp.headers["Retry-After"]
            assert "rank 1 is gone" not in resp.text and "error id err-" in resp.text
        resp = requests.post(f"{server.url}/generate", json={"prompt_token_ids": [5]}, timeout=5)
        assert resp.status_code == 503 and "rank 1 is gone" not in resp.text
    finally:
        loop.stop()
        server.close()


def test_idle_heartbeat_notices_dead_rank():
    engine = FakeEngine(build_tokenizer())
    fatal = []
    loop, server = serve_fake(engine, loop={"on_fatal": fatal.append})
    try:
        t0 = time.monotonic()
        engine.dead = "rank 3 is gone"
        assert wait_until(lambda: fatal, 5)
        assert time.monotonic() - t0 < 2  # heartbeat interval is 0.2 s
        assert requests.get(f"{server.url}/health", timeout=5).status_code == 503
    finally:
        loop.stop()
        server.close()


def test_hung_rank_watchdog():
    """A collective that never returns (a hung rank) trips the watchdog."""
    engine = FakeEngine(build_tokenizer())
    release = threading.Event()
    fatal = []
    loop, server = serve_fake(engine, loop={"on_fatal": fatal.append, "heartbeat_timeout_s": 1.0})
    try:
        engine.heartbeat = lambda: release.wait(30)
        assert wait_until(lambda: fatal, 5)
        assert "did not return" in str(fatal[0])
    finally:
        release.set()
        loop.stop()
        server.close()


def test_stop_fails_in_flight_requests():
    engine = FakeEngine(build_tokenizer(), step_delay_s=0.02)
    loop, server = serve_fake(engine)
    try:
        body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True}
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                requests.post, f"{server.url}/v1/completions", json=body, timeout=20
            )
            assert wait_until(lambda: engine.requests, 5)
            loop.stop("server shutting down")
            resp = pending.result()
        assert resp.status_code == 503 and "shutting down" in resp.json()["error"]["message"]
        assert engine.shut_down
        assert requests.get(f"{server.url}/health", timeout=5).json()["status"] == "stopping"
    finally:
        server.close()
