"""Completions, chat and /generate: answers equal the engine's, streamed or not.

The real EngineLoop, Flask app and waitress server run in-process with a deterministic
fake engine (tests/helpers/fake_engine.py), so these are fast and exact; the fixtures
``main`` and ``strict`` are in conftest.py. The real engine behind the same server:
test_server_e2e.py.
"""

from __future__ import annotations

import dataclasses
import json

import requests

from dstp.engine.sampling_params import SamplingParams, StructuredOutputs
from tests.helpers.server_helpers import (
    chat_ids,
    encode,
    openai_client,
    sse_events,
)


def test_completion_matches_engine(main):
    engine, _, url = main
    prompt = "The quick brown fox"
    got = openai_client(url).completions.create(
        model="fake-model", prompt=prompt, max_tokens=12, temperature=0
    )
    text, ids, finish = engine.reference(encode(engine, prompt), SamplingParams(max_tokens=12))[0]
    assert got.choices[0].text == text and got.choices[0].finish_reason == finish
    assert got.usage.prompt_tokens == len(encode(engine, prompt))
    assert got.usage.completion_tokens == len(ids)
    assert got.object == "text_completion" and got.id.startswith("cmpl-")


def test_completion_stream_with_usage(main):
    engine, _, url = main
    prompt = [5, 9, 40, 41, 42]
    chunks = list(
        openai_client(url).completions.create(
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
    client = openai_client(url)
    want, _, _ = engine.reference(chat_ids(engine, messages), SamplingParams(max_tokens=10))[0]
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
    got = openai_client(url).chat.completions.create(
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
        encode(engine, prompt), SamplingParams(max_tokens=20, ignore_eos=True)
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
    "structured_outputs": {"regex": "[a-z ]+"},
}


def test_every_accepted_sampling_field_reaches_the_engine(main):
    engine, _, url = main
    names = [f.name for f in dataclasses.fields(SamplingParams)]
    assert sorted(NON_DEFAULT) == sorted(names)
    constraint = StructuredOutputs(regex=NON_DEFAULT["structured_outputs"]["regex"])
    want = SamplingParams(**{**NON_DEFAULT, "structured_outputs": constraint})
    default = SamplingParams()
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
        request_id = answer.get("request_id") or answer["id"]  # the engine's id is the client's
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
