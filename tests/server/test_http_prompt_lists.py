"""Prompt lists (n choices per prompt, OpenAI's indices), continuous usage stats and
chat_template_kwargs.

The real EngineLoop, Flask app and waitress server run in-process with a deterministic
fake engine (tests/helpers/fake_engine.py), so these are fast and exact; the fixtures
``main`` and ``strict`` are in conftest.py. The real engine behind the same server:
test_server_e2e.py.
"""

from __future__ import annotations

import pytest
import requests

from dstp.engine.sampling_params import SamplingParams
from dstp.model.default_model import build_tokenizer
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server_helpers import (
    encode,
    openai_client,
    serve_fake,
    sse_events,
)


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
    ids = [encode(engine, t) for t in texts]
    prompt = ids if as_ids else texts
    want = _expected_choices(engine, ids, n=2, max_tokens=6, ignore_eos=True)
    got = openai_client(url).completions.create(
        model="fake-model", prompt=prompt, n=2, max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert [(c.index, c.text, c.finish_reason) for c in got.choices] == want
    assert got.usage.prompt_tokens == sum(map(len, ids))
    assert got.usage.completion_tokens == 6 * 2 * len(ids)
    # streamed: the same choices, indexed the same way, and the same usage
    stream = openai_client(url).completions.create(
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
    prompts = [encode(engine, t) for t in texts]
    want = _expected_choices(engine, prompts, max_tokens=3, ignore_eos=True)
    assert [c["text"] for c in got["choices"]] == [
        t + w[1] for t, w in zip(texts, want, strict=True)
    ]
    single = openai_client(url).completions.create(
        model="fake-model", prompt=["The quick brown fox"], max_tokens=5
    )
    plain = openai_client(url).completions.create(
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


KWARGS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if shout %}LOUD {% endif %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_chat_template_kwargs_reach_the_template():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = KWARGS_TEMPLATE
    engine = FakeEngine(tokenizer)
    loop, server = serve_fake(engine)
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
        answer = openai_client(server.url).chat.completions.create(
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
        loop.stop()
        server.close()
