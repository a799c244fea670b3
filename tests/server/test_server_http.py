"""HTTP layer on the production WSGI server, with a deterministic fake engine.

The real EngineLoop, Flask app and waitress server run in-process; only the
engine is a test double (tests/fake_engine.py) so that validation, error
shapes, SSE framing, concurrency, limits and disconnect handling are tested
fast and exactly. The real engine behind the same server is test_server_e2e.py.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from dstp.engine.sampling_params import SamplingParams
from dstp.model.default_model import build_tokenizer
from dstp.server.app import create_app
from dstp.server.engine_loop import EngineLoop
from dstp.server.limits import http_threads
from dstp.server.serving import ServerConfig
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server_helpers import InProcessServer, parse_metrics, sse_events, wait_until

API_KEY = "sk-test-123"


def _serve(engine, **config):
    driver = EngineLoop(engine, heartbeat_interval_s=0.2, **config.pop("driver", {}))
    driver.start()
    cfg = ServerConfig(
        model_name="fake-model",
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        **config,
    )
    server = InProcessServer.start(
        create_app(driver, engine.tokenizer, cfg),
        threads=http_threads(driver.max_queued_requests),  # sized as in production
        max_body_bytes=cfg.max_body_bytes,
    )
    return driver, server


@pytest.fixture(scope="module")
def main():
    """The main server: fake engine, no API key, default limits."""
    engine = FakeEngine(build_tokenizer())
    driver, server = _serve(engine)
    yield engine, driver, server.url
    driver.stop()
    server.close()


@pytest.fixture(scope="module")
def strict():
    """A server with an API key, a tiny queue and body limit, slow steps, no chat template."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    engine = FakeEngine(tokenizer, step_delay_s=0.05)
    driver, server = _serve(
        engine,
        api_key=API_KEY,
        max_body_bytes=2048,
        driver={"max_queued_requests": 2},
    )
    yield engine, driver, server.url
    driver.stop()
    server.close()


def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def _encode(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


def _chat_ids(engine, messages) -> list[int]:
    text = engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    return engine.tokenizer.encode(text, add_special_tokens=False)


# -- happy paths with the official client ---------------------------------------------
def test_models_health_metrics(main):
    engine, driver, url = main
    models = _client(url).models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert _client(url).models.retrieve("fake-model").id == "fake-model"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        _client(url).models.retrieve("gpt-4")
    from dstp import __version__

    assert requests.get(f"{url}/version", timeout=5).json() == {"version": __version__}
    assert requests.get(f"{url}/health", timeout=5).json()["status"] == "ok"
    metrics = parse_metrics(requests.get(f"{url}/metrics", timeout=5).text)
    assert metrics["dstp:kv_cache_usage_perc"] == 1 - engine.free_blocks / engine.num_blocks
    hits, queries = (
        metrics["dstp:prefix_cache_hits_total"],
        metrics["dstp:prefix_cache_queries_total"],
    )
    assert hits / queries == pytest.approx(0.4)


def test_completion_matches_engine(main):
    engine, _, url = main
    prompt = "The quick brown fox"
    got = _client(url).completions.create(
        model="fake-model", prompt=prompt, max_tokens=12, temperature=0
    )
    text, ids, finish = engine.reference(_encode(engine, prompt), SamplingParams(max_tokens=12))[0]
    assert got.choices[0].text == text and got.choices[0].finish_reason == finish
    assert got.usage.prompt_tokens == len(_encode(engine, prompt))
    assert got.usage.completion_tokens == len(ids)
    assert got.object == "text_completion" and got.id.startswith("cmpl-")


def test_completion_stream_with_usage(main):
    engine, _, url = main
    prompt = [5, 9, 40, 41, 42]
    chunks = list(
        _client(url).completions.create(
            model="fake-model",
            prompt=prompt,
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "min_tokens": 2},  # documented extensions
        )
    )
    text, ids, _ = engine.reference(prompt, SamplingParams(max_tokens=9, ignore_eos=True))[0]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == len(ids) == 9
    assert len({c.id for c in chunks}) == 1


def test_chat_and_chat_stream(main):
    engine, _, url = main
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
    ]
    client = _client(url)
    want, _, _ = engine.reference(_chat_ids(engine, messages), SamplingParams(max_tokens=10))[0]
    got = client.chat.completions.create(model="fake-model", messages=messages, max_tokens=10)
    assert got.choices[0].message.content == want
    assert got.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="fake-model", messages=messages, max_completion_tokens=10, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_logprobs_and_n(main):
    engine, _, url = main
    got = _client(url).chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        n=3,
        logprobs=True,
        top_logprobs=1,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in got.choices) == [0, 1, 2]
    assert len({c.message.content for c in got.choices}) == 3  # the fake varies by sample index
    content = got.choices[0].logprobs.content
    assert len(content) == 4 and content[0].logprob == -0.25
    assert content[0].top_logprobs[0].token


def test_stop_string_and_eos(main):
    engine, _, url = main
    prompt = "stop test"
    full, _, _ = engine.reference(
        _encode(engine, prompt), SamplingParams(max_tokens=20, ignore_eos=True)
    )[0]
    stop = full[5:7]
    got = requests.post(
        f"{url}/v1/completions",
        json={"prompt": prompt, "max_tokens": 20, "stop": stop, "ignore_eos": True},
        timeout=10,
    ).json()
    assert got["choices"][0]["text"] == full[: full.index(stop)]
    assert got["choices"][0]["finish_reason"] == "stop"
    # sum(prompt) % 5 == 0 makes the fake emit EOS as its 4th token
    ids = [5, 10]
    got = requests.post(
        f"{url}/generate", json={"prompt_token_ids": ids, "max_tokens": 10}, timeout=10
    ).json()
    assert got["outputs"][0]["finish_reason"] == "stop"
    assert (
        got["outputs"][0]["token_ids"][-1] == engine.eos_id
        and len(got["outputs"][0]["token_ids"]) == 4
    )


def test_generate_native(main):
    engine, _, url = main
    ids = [7, 8, 9, 10, 11, 12]
    body = {"prompt_token_ids": ids, "max_tokens": 6, "logprobs": 1, "ignore_eos": True}
    got = requests.post(f"{url}/generate", json=body, timeout=10).json()
    _, want_ids, _ = engine.reference(ids, SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert got["outputs"][0]["token_ids"] == want_ids
    assert got["prompt_token_ids"] == ids
    assert len(got["outputs"][0]["logprobs"]) == 6
    resp = requests.post(f"{url}/generate", json={**body, "stream": True}, stream=True, timeout=10)
    events = sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]"
    streamed = [t for e in events[:-2] for o in e["outputs"] for t in o["new_token_ids"]]
    assert streamed == want_ids
    assert events[-2]["usage"]["completion_tokens"] == 6


# A value other than the default for every SamplingParams field: a new field needs one here.
NON_DEFAULT = {
    "max_tokens": 5,
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 7,
    "min_p": 0.1,
    "repetition_penalty": 1.1,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "seed": 1234,
    "n": 2,
    "stop": ["zz"],
    "stop_token_ids": [5],
    "ignore_eos": True,
    "min_tokens": 2,
    "logprobs": 3,
}


def test_every_accepted_sampling_field_reaches_the_engine(main):
    engine, _, url = main
    names = [f.name for f in dataclasses.fields(SamplingParams)]
    assert sorted(NON_DEFAULT) == sorted(names)
    want, default = SamplingParams(**NON_DEFAULT), SamplingParams()
    assert all(getattr(want, k) != getattr(default, k) for k in names)
    chat = {"messages": [{"role": "user", "content": "hi"}], **NON_DEFAULT}
    chat.update(logprobs=True, top_logprobs=3)  # chat's spelling: a flag plus a count
    cases = [
        ("/v1/completions", {"prompt": "abc", **NON_DEFAULT}),
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", {**chat, "max_tokens": None, "max_completion_tokens": 5}),
        ("/generate", {"prompt_token_ids": [7, 8, 9], **NON_DEFAULT}),
    ]
    for path, body in cases:
        resp = requests.post(f"{url}{path}", json=body, timeout=10)
        assert resp.status_code == 200, (path, resp.text)
        answer = resp.json()
        request_id = answer.get("request_id") or answer["id"].split("-", 1)[1]
        got = engine.received[request_id]
        assert {k: getattr(got, k) for k in names} == {k: getattr(want, k) for k in names}, path


def test_sse_wire_format(main):
    """Raw bytes: 'data: {json}\\n\\n' frames, event-stream type, [DONE] last."""
    _, _, url = main
    resp = requests.post(
        f"{url}/v1/completions",
        json={"prompt": "abc", "max_tokens": 3, "stream": True, "ignore_eos": True},
        stream=True,
        timeout=10,
    )
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = resp.raw.read().decode()
    frames = raw.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    for frame in frames[:-2]:
        assert frame.startswith("data: ") and "\n" not in frame
        assert json.loads(frame[6:])["object"] == "text_completion"


def test_fields_that_do_not_change_generation_are_ignored(main):
    _, _, url = main
    ignored = {"user": "u1", "store": False, "metadata": {"k": "v"}, "service_tier": "auto"}
    body = {"prompt": "x", "max_tokens": 2, **ignored, "prompt_cache_key": "c"}
    assert requests.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    chat |= {"parallel_tool_calls": True, **ignored}
    assert requests.post(f"{url}/v1/chat/completions", json=chat, timeout=30).status_code == 200
    resp = requests.post(f"{url}/v1/completions", json={**body, "max_token": 2}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_token"


# -- bad input -------------------------------------------------------------------------
BAD_COMPLETIONS = [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "max_token": 5}, "max_token"),
    ({"prompt": "x", "frobnicate": True}, "frobnicate"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": ["a", [1, 2]]}, "prompt"),  # a mix of text and token ids
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": ["a"] * 129}, "prompt"),  # more prompts than MAX_PROMPTS
    ({"prompt": "x", "stream": True, "stream_options": {"continuous_usage_stats": 1}}, None),
    ({"prompt": [1, 2, 10**9]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias"),
    ({"prompt": "x", "ignore_eos": "true"}, "ignore_eos"),
    ({"prompt": "x", "min_tokens": 20, "max_tokens": 5}, None),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x " * 300}, "prompt"),  # longer than the 256-token context
    ({"prompt": "x", "max_tokens": 1000}, "max_tokens"),  # prompt + completion > context
]


@pytest.mark.parametrize(
    ("body", "param"), BAD_COMPLETIONS, ids=[json.dumps(b)[:40] for b, _ in BAD_COMPLETIONS]
)
def test_bad_completion_requests_get_400(main, body, param):
    _, _, url = main
    resp = requests.post(f"{url}/v1/completions", json=body, timeout=10)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param, err


BAD_CHATS = [
    {"messages": []},
    {"messages": "hi"},
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    {"messages": [{"role": "user", "content": "x"}], "logprobs": 1},
    {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
    {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
    {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1},
    {"messages": [{"role": "user", "content": "x"}], "prompt": "x"},
]


@pytest.mark.parametrize("body", BAD_CHATS, ids=[json.dumps(b)[:40] for b in BAD_CHATS])
def test_bad_chat_requests_get_400(main, body):
    _, _, url = main
    resp = requests.post(f"{url}/v1/chat/completions", json=body, timeout=10)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["message"]


def test_malformed_bodies(main):
    _, _, url = main
    for data in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        resp = requests.post(
            f"{url}/v1/completions",
            data=data,
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert resp.status_code == 400, (data, resp.text)
        assert "JSON" in resp.json()["error"]["message"]
    resp = requests.post(
        f"{url}/v1/completions", json={"prompt": "x", "model": "gpt-4"}, timeout=10
    )
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    resp = requests.get(f"{url}/v1/nope", timeout=10)
    assert resp.status_code == 404 and "error" in resp.json()
    resp = requests.get(f"{url}/v1/completions", timeout=10)
    assert resp.status_code == 405 and "error" in resp.json()
    with pytest.raises(openai.BadRequestError):
        _client(url).completions.create(model="fake-model", prompt="x", max_tokens=-3)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonp",
    ],
)
def test_non_json_content_type_415(main, content_type):
    """What a web page can send cross-site without a CORS preflight is refused."""
    _, _, url = main
    headers = {"Content-Type": content_type} if content_type else {}
    data = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
        req = requests.Request("POST", f"{url}{path}", data=data, headers=headers).prepare()
        if content_type is None:
            req.headers.pop("Content-Type", None)
        resp = requests.Session().send(req, timeout=10)
        assert resp.status_code == 415, (path, resp.text)
        err = resp.json()["error"]
        assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]


def test_json_content_type_with_parameters_accepted(main):
    _, _, url = main
    resp = requests.post(
        f"{url}/v1/completions",
        data=json.dumps({"prompt": "x", "max_tokens": 1}),
        headers={"Content-Type": "Application/JSON; charset=utf-8"},
        timeout=10,
    )
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("depth", [65, 3000, 100_000])
def test_deeply_nested_json_400(main, depth):
    _, _, url = main
    for raw in (
        "[" * depth + "]" * depth,
        '{"prompt": "x", "stop": ' + "[" * depth + "]" * depth + "}",
        '{"prompt": "x", "user": ' + '{"a":' * depth + "1" + "}" * depth + "}",
    ):
        resp = requests.post(
            f"{url}/v1/completions",
            data=raw,
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert resp.status_code == 400, resp.text[:300]
        err = resp.json()["error"]
        assert err["code"] == "json_too_deep" and "nested too deeply" in err["message"]


LONE_SURROGATES = [  # raw JSON text: the escape reaches the server as written
    ("/v1/completions", r'{"prompt": "\ud800"}', "prompt"),
    ("/v1/completions", r'{"prompt": ["ab\udfffc"]}', "prompt"),
    ("/v1/completions", r'{"prompt": "x", "stop": "\udc00"}', "stop"),
    ("/v1/completions", r'{"prompt": "x", "stop": ["ok", "a\ud83d"]}', "stop"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "\ud800"}]}', "messages"),
    (
        "/v1/chat/completions",
        r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}',
        "messages",
    ),
    (
        "/v1/chat/completions",
        r'{"messages": [{"role": "user", "content": "hi", "name": "\udbff"}]}',
        "messages",
    ),
    ("/generate", r'{"prompt_token_ids": [5, 6], "stop": "\ud800"}', "stop"),
]


@pytest.mark.parametrize(("path", "raw", "param"), LONE_SURROGATES)
def test_lone_surrogate_400(main, path, raw, param):
    _, _, url = main
    resp = requests.post(
        f"{url}{path}", data=raw, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and "surrogate" in err["message"], err


def test_surrogate_pair_is_fine(main):
    """A correctly escaped astral character (a surrogate *pair*) is ordinary text."""
    _, _, url = main
    resp = requests.post(
        f"{url}/v1/completions",
        data=r'{"prompt": "smile \ud83d\ude00", "max_tokens": 2, "stop": "\ud83d\ude00"}',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert resp.status_code == 200, resp.text


def test_internal_error_is_generic_with_id(main, caplog, monkeypatch):
    """A bug answers 500 with an id; its text and traceback go to the log only."""
    engine, driver, url = main
    secret = "secret-internal-detail-42"

    def broken_add(*_args, **_kwargs):
        raise RuntimeError(secret)

    monkeypatch.setattr(engine, "add_request", broken_add)
    with caplog.at_level("ERROR", logger="dstp"):
        resp = requests.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=10)
    assert resp.status_code == 500
    err = resp.json()["error"]
    assert secret not in resp.text and "RuntimeError" not in resp.text
    assert err["type"] == "server_error" and err["code"] == "internal_error"
    error_id = re.search(r"err-[0-9a-f]{12}", err["message"]).group(0)
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info and secret in str(logged[0].exc_info[1])
    assert wait_until(lambda: driver.num_in_flight == 0, 5)


def test_internal_error_mid_stream_is_generic(main, caplog, monkeypatch):
    import dstp.server.serving

    _, _, url = main
    secret = "secret-stream-detail-7"

    def broken(_reason):
        raise KeyError(secret)

    monkeypatch.setattr(dstp.server.serving, "_finish_reason_or_raise", broken)
    with caplog.at_level("ERROR", logger="dstp"):
        resp = requests.post(
            f"{url}/v1/completions",
            json={"prompt": "x", "max_tokens": 3, "stream": True},
            stream=True,
            timeout=10,
        )
        events = sse_events(resp.iter_lines())
    assert resp.status_code == 200 and secret not in json.dumps(events)
    err = events[-1]["error"]
    assert err["code"] == "internal_error"
    error_id = re.search(r"err-[0-9a-f]{12}", err["message"]).group(0)
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)


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
    engine, driver, url = main
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
        assert wait_until(lambda: driver.num_in_flight == 0, 5)
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
        _client(url, "wrong").completions.create(model="fake-model", prompt="x")
    got = _client(url, API_KEY).completions.create(model="fake-model", prompt="x", max_tokens=2)
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
        _client(url, API_KEY).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}]
        )


def test_full_queue_429_with_retry_after(strict):
    engine, driver, url = strict
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "slow", "max_tokens": 16, "ignore_eos": True}
    with ThreadPoolExecutor(2) as pool:
        slow = [
            pool.submit(
                requests.post, f"{url}/v1/completions", json=body, headers=headers, timeout=30
            )
            for _ in range(2)
        ]
        assert wait_until(lambda: driver.num_in_flight == 2, 10)
        resp = requests.post(f"{url}/v1/completions", json=body, headers=headers, timeout=10)
        assert resp.status_code == 429, resp.text
        assert int(resp.headers["Retry-After"]) >= 1
        assert resp.json()["error"]["code"] == "queue_full"
        assert all(f.result().status_code == 200 for f in slow)
    resp = requests.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
    assert resp.status_code == 200  # room again


# -- concurrency ----------------------------------------------------------------------
def test_many_concurrent_clients_mixed(main):
    """40 clients at once, a third of them invalid; each valid one answered exactly and once."""
    engine, driver, url = main
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
    assert wait_until(lambda: driver.num_in_flight == 0, 5)
    metrics = parse_metrics(requests.get(f"{url}/metrics", timeout=5).text)
    assert engine.free_blocks == engine.num_blocks  # no block leaked
    assert metrics["dstp:kv_cache_usage_perc"] == 0
    assert metrics["dstp:num_requests_in_flight"] == 0
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    assert len(engine.thread_ids) == 1  # only the driver thread ever touched the engine


# -- failures -------------------------------------------------------------------------
def test_engine_failure_errors_in_flight_and_health():
    """A rank 'dies' mid-stream: the stream gets an error event, /health 503, on_fatal runs."""
    engine = FakeEngine(build_tokenizer(), step_delay_s=0.02)
    fatal = []
    driver, server = _serve(engine, driver={"on_fatal": fatal.append})
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
        assert "error" in events[-1] and "rank 1 is gone" in events[-1]["error"]["message"]
        assert wait_until(lambda: fatal, 5)
        health = requests.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        resp = requests.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=5)
        assert resp.status_code == 503 and resp.headers["Retry-After"]
    finally:
        driver.stop()
        server.close()


def test_idle_heartbeat_notices_dead_rank():
    engine = FakeEngine(build_tokenizer())
    fatal = []
    driver, server = _serve(engine, driver={"on_fatal": fatal.append})
    try:
        t0 = time.monotonic()
        engine.dead = "rank 3 is gone"
        assert wait_until(lambda: fatal, 5)
        assert time.monotonic() - t0 < 2  # heartbeat interval is 0.2 s
        assert requests.get(f"{server.url}/health", timeout=5).status_code == 503
    finally:
        driver.stop()
        server.close()


def test_hung_rank_watchdog():
    """A collective that never returns (a hung rank) trips the watchdog."""
    engine = FakeEngine(build_tokenizer())
    release = threading.Event()
    fatal = []
    driver, server = _serve(engine, driver={"on_fatal": fatal.append, "heartbeat_timeout_s": 1.0})
    try:
        engine.heartbeat = lambda: release.wait(30)
        assert wait_until(lambda: fatal, 5)
        assert "did not return" in str(fatal[0])
    finally:
        release.set()
        driver.stop()
        server.close()


def test_stop_fails_in_flight_requests():
    engine = FakeEngine(build_tokenizer(), step_delay_s=0.02)
    driver, server = _serve(engine)
    try:
        body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True}
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                requests.post, f"{server.url}/v1/completions", json=body, timeout=20
            )
            assert wait_until(lambda: engine.requests, 5)
            driver.stop("server shutting down")
            resp = pending.result()
        assert resp.status_code == 503 and "shutting down" in resp.json()["error"]["message"]
        assert engine.shut_down
        assert requests.get(f"{server.url}/health", timeout=5).json()["status"] == "stopping"
    finally:
        server.close()


# -- prompt lists, continuous usage, tokenize, chat_template_kwargs -----------------------
def _expected_choices(engine, prompts: list[list[int]], **params) -> list[tuple[int, str, str]]:
    """(OpenAI index, text, finish_reason) per choice: prompt by prompt, n choices each."""
    sp = SamplingParams(**params)
    out = []
    for p, ids in enumerate(prompts):
        for j, (text, _, finish) in enumerate(engine.reference(ids, sp)):
            out.append((p * sp.n + j, text, finish))
    return out


@pytest.mark.parametrize("as_ids", [False, True], ids=["strings", "token_ids"])
def test_prompt_list_one_choice_per_prompt_times_n(main, as_ids):
    engine, _, url = main
    texts = ["The quick brown fox", "hello", "a b c d e"]
    ids = [_encode(engine, t) for t in texts]
    prompt = ids if as_ids else texts
    want = _expected_choices(engine, ids, n=2, max_tokens=6, ignore_eos=True)
    got = _client(url).completions.create(
        model="fake-model", prompt=prompt, n=2, max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert [(c.index, c.text, c.finish_reason) for c in got.choices] == want
    assert got.usage.prompt_tokens == sum(map(len, ids))
    assert got.usage.completion_tokens == 6 * 2 * len(ids)
    # streamed: the same choices, indexed the same way, and the same usage
    stream = _client(url).completions.create(
        model="fake-model",
        prompt=prompt,
        n=2,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    texts_by_index: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts_by_index[c.index] = texts_by_index.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [(i, texts_by_index[i], finish[i]) for i in sorted(texts_by_index)] == want
    assert usage.completion_tokens == got.usage.completion_tokens
    assert usage.prompt_tokens == got.usage.prompt_tokens


def test_prompt_list_echo_and_single_item_list(main):
    engine, _, url = main
    texts = ["one two", "three"]
    got = requests.post(
        f"{url}/v1/completions",
        json={"prompt": texts, "max_tokens": 3, "echo": True, "ignore_eos": True},
        timeout=30,
    ).json()
    prompts = [_encode(engine, t) for t in texts]
    want = _expected_choices(engine, prompts, max_tokens=3, ignore_eos=True)
    assert [c["text"] for c in got["choices"]] == [
        t + w[1] for t, w in zip(texts, want, strict=True)
    ]
    single = _client(url).completions.create(
        model="fake-model", prompt=["The quick brown fox"], max_tokens=5
    )
    plain = _client(url).completions.create(
        model="fake-model", prompt="The quick brown fox", max_tokens=5
    )
    assert [c.text for c in single.choices] == [c.text for c in plain.choices]


def test_prompt_list_goes_to_the_engine_as_one_batch(main, monkeypatch):
    engine, _, url = main
    steps_at_add: list[int] = []
    add = engine.add_request

    def recording_add(request_id, prompt_token_ids, params):
        steps_at_add.append(engine.num_steps)
        return add(request_id, prompt_token_ids, params)

    monkeypatch.setattr(engine, "add_request", recording_add)
    resp = requests.post(
        f"{url}/v1/completions", json={"prompt": ["a", "b", "c", "d"], "max_tokens": 2}, timeout=30
    )
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 4
    assert len(steps_at_add) == 4 and len(set(steps_at_add)) == 1  # all before one step


def test_prompt_list_beyond_admission_limit_is_400(strict):
    _, _, url = strict
    body = {"prompt": ["a", "b", "c"], "max_tokens": 1}
    resp = requests.post(
        f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_on_every_chunk(main, path):
    _, _, url = main
    body = {"max_tokens": 5, "n": 2, "ignore_eos": True, "stream": True}
    if path == "/v1/completions":
        body["prompt"] = ["abc", "de"]
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    opts = {"include_usage": True, "continuous_usage_stats": True}
    resp = requests.post(f"{url}{path}", json={**body, "stream_options": opts}, stream=True)
    events = sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all("usage" in c for c in chunks), [c for c in chunks if "usage" not in c][:1]
    done = [c["usage"]["completion_tokens"] for c in chunks]
    assert done == sorted(done) and done[0] <= 2  # grows token by token
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5 * body["n"] * (
        2 if path == "/v1/completions" else 1
    )
    assert {c["usage"]["prompt_tokens"] for c in chunks} == {last["usage"]["prompt_tokens"]}
    for c in chunks:
        u = c["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # without it: usage only on the final chunk
    plain = requests.post(
        f"{url}{path}", json={**body, "stream_options": {"include_usage": True}}, stream=True
    )
    chunks = sse_events(plain.iter_lines())[:-1]
    assert [("usage" in c) for c in chunks] == [False] * (len(chunks) - 1) + [True]


def test_tokenize_detokenize_round_trip(main):
    engine, _, url = main
    tok = engine.tokenizer
    for text in ["hello world", "The quick brown fox", "  spaces  and\nnewlines", "é ü"]:
        got = requests.post(f"{url}/tokenize", json={"prompt": text}, timeout=10).json()
        assert got["tokens"] == tok.encode(text) and got["count"] == len(got["tokens"])
        assert got["max_model_len"] == engine.max_model_len and got["token_strs"] is None
        raw = requests.post(
            f"{url}/tokenize",
            json={"prompt": text, "add_special_tokens": False, "return_token_strs": True},
            timeout=10,
        ).json()
        assert raw["tokens"] == tok.encode(text, add_special_tokens=False)
        assert raw["token_strs"] == tok.convert_ids_to_tokens(raw["tokens"])
        back = requests.post(f"{url}/detokenize", json={"tokens": got["tokens"]}, timeout=10)
        assert back.json() == {"prompt": tok.decode(got["tokens"])}
    messages = [{"role": "user", "content": "hi there"}]
    chat = requests.post(f"{url}/tokenize", json={"messages": messages}, timeout=10).json()
    assert chat["tokens"] == _chat_ids(engine, messages)
    for body, param in [
        ({}, "prompt"),
        ({"prompt": "a", "messages": messages}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "a", "frobnicate": 1}, "frobnicate"),
    ]:
        resp = requests.post(f"{url}/tokenize", json=body, timeout=10)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    for tokens in ([1, 10**9], "abc", None):
        resp = requests.post(f"{url}/detokenize", json={"tokens": tokens}, timeout=10)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "tokens"


KWARGS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if shout %}LOUD {% endif %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_chat_template_kwargs_reach_the_template():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = KWARGS_TEMPLATE
    engine = FakeEngine(tokenizer)
    driver, server = _serve(engine)
    try:
        messages = [{"role": "user", "content": "hi"}]

        def rendered(**kw) -> list[int]:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **kw
            )
            return tokenizer.encode(text, add_special_tokens=False)

        assert rendered(shout=True) != rendered()
        body = {"messages": messages, "chat_template_kwargs": {"shout": True}}
        got = requests.post(f"{server.url}/tokenize", json=body, timeout=10).json()
        assert got["tokens"] == rendered(shout=True)
        answer = _client(server.url).chat.completions.create(
            model="fake-model",
            messages=messages,
            max_tokens=4,
            extra_body={"chat_template_kwargs": {"shout": True}, "ignore_eos": True},
        )
        assert answer.usage.prompt_tokens == len(rendered(shout=True))
        want = engine.reference(rendered(shout=True), SamplingParams(max_tokens=4, ignore_eos=True))
        assert answer.choices[0].message.content == want[0][0]
        for bad_kwargs in ({"tokenize": True}, ["shout"]):
            resp = requests.post(
                f"{server.url}/v1/chat/completions",
                json={"messages": messages, "chat_template_kwargs": bad_kwargs},
                timeout=10,
            )
            assert resp.status_code == 400
            assert resp.json()["error"]["param"] == "chat_template_kwargs"
    finally:
        driver.stop()
        server.close()
