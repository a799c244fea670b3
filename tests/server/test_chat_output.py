"""A chat choice's text -> message: reasoning, content and tool calls, whole and streamed.

Unit tests of ``ChatReader`` on real output shapes (a Qwen3 answer that thinks, speaks and
calls), and the plumbing through a server (fake engine): ``--reasoning-parser`` fills
``reasoning_content``, streamed as its own deltas, and ``enable_thinking: false`` turns
the split off.
"""

from __future__ import annotations

import json
import random

import pytest

from dstp.model.default_model import build_tokenizer
from dstp.server.chat_output import ChatReader
from dstp.server.reasoning import get_reasoning_parser
from dstp.server.tool_calls import get_parser
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server_helpers import openai_client, serve_fake

QWEN3_ANSWER = (
    "<think>\nThe user wants the weather. I should call get_weather.\n</think>\n\n"
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    "</tool_call>"
)


def reader() -> ChatReader:
    return ChatReader(get_reasoning_parser("qwen3"), get_parser("hermes"))


def streamed(text: str, cuts: list[int]) -> dict:
    """Deltas for ``text`` cut at ``cuts``, merged as a client merges them."""
    stream = reader().stream()
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    merged: dict = {"reasoning_content": "", "content": "", "tool_calls": []}
    for i, piece in enumerate(pieces):
        delta = stream.step(piece, final=i == len(pieces) - 1)
        for key in ("reasoning_content", "content"):
            merged[key] += delta.get(key, "")
        merged["tool_calls"] += delta.get("tool_calls", [])
    return merged


def test_thinking_content_and_calls_are_split():
    message, called = reader().message(QWEN3_ANSWER)
    assert called
    assert message["reasoning_content"].strip() == (
        "The user wants the weather. I should call get_weather."
    )
    assert message["content"].strip() == "Let me check."
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}


@pytest.mark.parametrize("seed", range(6))
def test_streamed_deltas_join_to_the_whole_message(seed):
    rng = random.Random(seed)
    n = len(QWEN3_ANSWER)
    cuts = sorted(rng.sample(range(1, n), rng.randint(1, 40)))
    merged = streamed(QWEN3_ANSWER, cuts if seed else list(range(1, n)))  # seed 0: per char
    message, _ = reader().message(QWEN3_ANSWER)
    assert merged["reasoning_content"] == message["reasoning_content"]
    assert merged["content"] == message["content"]
    assert [c["function"] for c in merged["tool_calls"]] == [
        c["function"] for c in message["tool_calls"]
    ]
    assert all(c["id"] and c["type"] == "function" for c in merged["tool_calls"])


def test_plain_answers_stay_plain():
    message, called = ChatReader().message("Once upon a time")
    assert (message, called) == ({"role": "assistant", "content": "Once upon a time"}, False)
    message, _ = ChatReader(tools=get_parser("hermes")).message("")
    assert message["content"] == ""  # no calls: an empty string, never null


@pytest.fixture(scope="module")
def r1_server():
    engine = FakeEngine(build_tokenizer())
    loop, server = serve_fake(engine, reasoning_parser="deepseek_r1")
    yield engine, server.url
    loop.stop()
    server.close()


def test_reasoning_parser_through_the_server(r1_server):
    """DeepSeek-R1's template opens <think> in the prompt: with no </think> yet, all the
    output is reasoning; enable_thinking false makes it all content."""
    _, url = r1_server
    client = openai_client(url)
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    chat |= {"max_tokens": 9, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**chat).choices[0].message
    reasoning = whole.model_extra["reasoning_content"]
    assert reasoning and whole.content is None
    parts = []
    for chunk in client.chat.completions.create(**chat, stream=True):
        for choice in chunk.choices:
            assert not choice.delta.content
            parts.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
    assert "".join(parts) == reasoning
    off = {
        **chat,
        "extra_body": {"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}},
    }
    plain = client.chat.completions.create(**off).choices[0].message
    assert plain.content == reasoning and not plain.model_extra.get("reasoning_content")
