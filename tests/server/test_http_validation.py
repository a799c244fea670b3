"""Bad input: every malformed or out-of-range request is a 400/415 naming the problem,
and internal errors never leak their text.

The real EngineLoop, Flask app and waitress server run in-process with a deterministic
fake engine (tests/helpers/fake_engine.py), so these are fast and exact; the fixtures
``main`` and ``strict`` are in conftest.py. The real engine behind the same server:
test_server_e2e.py.
"""

from __future__ import annotations

import json
import re

import openai
import pytest
import requests

from tests.helpers.server_helpers import (
    openai_client,
    sse_events,
    wait_until,
)

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
    {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
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
        openai_client(url).completions.create(model="fake-model", prompt="x", max_tokens=-3)


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
    engine, loop, url = main
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
    assert wait_until(lambda: loop.num_in_flight == 0, 5)


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
