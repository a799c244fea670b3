"""Limits and auth: 413 for large bodies, 429 past the admission limit, the API key, errors
counted by status, and client disconnects freeing their KV blocks.

The real EngineLoop, Flask app and waitress server run in-process with a deterministic
fake engine (tests/helpers/fake_engine.py), so these are fast and exact; the fixtures
``main`` and ``strict`` are in conftest.py. The real engine behind the same server:
test_server_e2e.py.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from tests.helpers.server_helpers import (
    API_KEY,
    openai_client,
    parse_metrics,
    wait_until,
)


def test_huge_body_gets_json_413_every_client_reads(main):
    """64 MiB against the 4 MiB limit: urllib and requests (which send the whole body before
    reading) get the JSON 413, also chunked; with Expect: 100-continue it comes at once."""
    _, _, url = main
    big = b"x" * (64 << 20)

    def check(status: int, payload: bytes) -> None:
        assert status == 413, payload[:200]
        assert json.loads(payload)["error"]["code"] == "body_too_large"

    req = urllib.request.Request(
        f"{url}/v1/completions", data=big, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    check(info.value.code, info.value.read())

    resp = requests.post(
        f"{url}/v1/completions", data=big, headers={"Content-Type": "application/json"}, timeout=30
    )
    check(resp.status_code, resp.content)

    chunks = (big[i : i + (1 << 20)] for i in range(0, len(big), 1 << 20))  # chunked upload
    resp = requests.post(
        f"{url}/v1/completions",
        data=chunks,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    check(resp.status_code, resp.content)

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/json\r\nExpect: 100-continue\r\n"
            f"Content-Length: {len(big)}\r\n\r\n".encode()
        )
        got = b""
        while b"\r\n\r\n" not in got or not got.endswith(b"}}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    head, _, payload = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"100 Continue" not in head, got[:200]
    check(413, payload)

    resp = requests.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10)
    assert resp.status_code == 200  # unharmed


def test_errors_counted_by_status(main):
    _, _, url = main
    ok = {"prompt": "x", "max_tokens": 3, "ignore_eos": True}
    assert requests.post(f"{url}/v1/completions", json=ok, timeout=10).status_code == 200
    requests.post(f"{url}/v1/completions", json={"prompt": "x", "n": 99}, timeout=10)
    metrics = parse_metrics(requests.get(f"{url}/metrics", timeout=5).text)
    assert metrics['http_requests_total{handler="/v1/completions",method="POST",status="400"}'] >= 1
    assert metrics['http_requests_total{handler="/v1/completions",method="POST",status="200"}'] >= 1
    assert metrics["dstp:time_to_first_token_seconds_count"] >= 1
    assert metrics["dstp:time_per_output_token_seconds_count"] >= 1
    assert metrics["dstp:generation_tokens_total"] >= 1


# -- disconnects ----------------------------------------------------------------------
def _raw_post(url: str, path: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    sock.sendall(head + data)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_and_frees_blocks(main, stream):
    engine, loop, url = main
    engine.step_delay_s = 0.01
    try:
        before = len(engine.aborted)
        body = {"prompt": "long one", "max_tokens": 200, "ignore_eos": True, "stream": stream}
        sock = _raw_post(url, "/v1/completions", body)
        if stream:
            got = b""
            while b"data: " not in got:  # generation is under way
                chunk = sock.recv(4096)
                assert chunk, got
                got += chunk
        else:
            assert wait_until(lambda: engine.requests, 5)
        sock.close()
        assert wait_until(lambda: len(engine.aborted) > before, 10), "request not aborted"
        assert wait_until(lambda: engine.free_blocks == engine.num_blocks, 5)
        assert wait_until(lambda: loop.num_in_flight == 0, 5)
        assert engine.num_steps  # and the server still answers
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        engine.step_delay_s = 0.0


# -- limits, auth ---------------------------------------------------------------------
def test_api_key(strict):
    _, _, url = strict
    assert requests.get(f"{url}/health", timeout=5).status_code == 200  # no key needed
    for path in ("/v1/models", "/metrics"):
        resp = requests.get(f"{url}{path}", timeout=5)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        resp = requests.get(f"{url}{path}", headers={"Authorization": "Bearer wrong"}, timeout=5)
        assert resp.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai_client(url, "wrong").completions.create(model="fake-model", prompt="x")
    got = openai_client(url, API_KEY).completions.create(
        model="fake-model", prompt="x", max_tokens=2
    )
    assert got.choices[0].text


def test_body_too_large_413(strict):
    _, _, url = strict
    headers = {"Authorization": f"Bearer {API_KEY}"}
    resp = requests.post(
        f"{url}/v1/completions", json={"prompt": "x" * 5000}, headers=headers, timeout=10
    )
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"
    # the server is unharmed
    resp = requests.post(
        f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers, timeout=10
    )
    assert resp.status_code == 200


def test_no_chat_template_400(strict):
    _, _, url = strict
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        openai_client(url, API_KEY).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}]
        )


def test_full_queue_429_with_retry_after(strict):
    engine, loop, url = strict
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "slow", "max_tokens": 16, "ignore_eos": True}
    with ThreadPoolExecutor(2) as pool:
        slow = [
            pool.submit(
                requests.post, f"{url}/v1/completions", json=body, headers=headers, timeout=30
            )
            for _ in range(2)
        ]
        assert wait_until(lambda: loop.num_in_flight == 2, 10)
        resp = requests.post(f"{url}/v1/completions", json=body, headers=headers, timeout=10)
        assert resp.status_code == 429, resp.text
        assert int(resp.headers["Retry-After"]) >= 1
        assert resp.json()["error"]["code"] == "queue_full"
        assert all(f.result().status_code == 200 for f in slow)
    resp = requests.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
    assert resp.status_code == 200  # room again


def test_prompt_list_beyond_admission_limit_is_400(strict):
    _, _, url = strict
    body = {"prompt": ["a", "b", "c"], "max_tokens": 1}
    resp = requests.post(
        f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
