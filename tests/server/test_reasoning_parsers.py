"""Reasoning parsers: DeepSeek-R1 and Qwen3 outputs split into reasoning and content, whole
and streamed in every split, and where the answer (structured output's start) begins."""

from __future__ import annotations

import random

import pytest

from dstp.server.reasoning import get_reasoning_parser

# (parser, output, reasoning, content)
CASES = [
    # DeepSeek-R1: <think> opened by the template, so the output starts inside reasoning.
    (
        "deepseek_r1",
        "Okay, the user asks 2+2. That is 4.\n</think>\n\nThe answer is **4**.",
        "Okay, the user asks 2+2. That is 4.\n",
        "\n\nThe answer is **4**.",
    ),
    (
        "deepseek_r1",
        "<think>\nHmm, 日本語で答える。\n</think>\n\nはい。",
        "\nHmm, 日本語で答える。\n",
        "\n\nはい。",
    ),
    (
        "deepseek_r1",
        "Still thinking about x < y and <thin",
        "Still thinking about x < y and <thin",
        None,
    ),
    ("deepseek_r1", "reasoning only</think>", "reasoning only", None),
    ("deepseek_r1", "</think>Just the answer", None, "Just the answer"),
    ("deepseek_r1", "a</think>b</think>c", "a", "b</think>c"),
    ("deepseek_r1", "", None, None),
    # Qwen3: the model writes <think> itself; without it, thinking was off.
    (
        "qwen3",
        '<think>\nThe user wants JSON. I\'ll comply.\n</think>\n\n{"answer": 4}',
        "\nThe user wants JSON. I'll comply.\n",
        '\n\n{"answer": 4}',
    ),
    ("qwen3", "<think>\n\n</think>\n\nHello!", "\n\n", "\n\nHello!"),
    ("qwen3", "Hello! How can I help?", None, "Hello! How can I help?"),
    ("qwen3", "<think>cut off mid-thought", "cut off mid-thought", None),
    ("qwen3", "I use <think> tags</think> in text", None, "I use <think> tags</think> in text"),
    ("qwen3", "<thi", None, "<thi"),
    ("qwen3", "\n<think>x</think>y", "x", "y"),
]


@pytest.mark.parametrize("name,text,reasoning,content", CASES)
def test_split(name: str, text: str, reasoning: str | None, content: str | None) -> None:
    assert get_reasoning_parser(name).split(text) == (reasoning, content)


def _splits(text: str) -> list[list[str]]:
    rng = random.Random(len(text))
    out = [list(text), [text]]
    for _ in range(6):
        if len(text) < 2:
            break
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


@pytest.mark.parametrize("name,text,reasoning,content", CASES)
def test_stream_matches_split(name: str, text: str, reasoning, content) -> None:
    parser = get_reasoning_parser(name)
    for chunks in _splits(text):
        s = parser.stream()
        pieces = [p for c in chunks for p in s.feed(c)] + s.finish()
        assert all(kind in ("reasoning", "content") and piece for kind, piece in pieces)
        got = tuple(
            "".join(t for k, t in pieces if k == kind) or None for kind in ("reasoning", "content")
        )
        assert got == (reasoning, content), chunks


def test_stream_releases_early() -> None:
    """Reasoning and content flow as they come; only a possible tag is held back."""
    s = get_reasoning_parser("deepseek_r1").stream()
    assert s.feed("Let me think") == [("reasoning", "Let me think")]
    assert s.feed(" more</thi") == [("reasoning", " more")]
    assert s.feed("nk>\n\nAnswer") == [("content", "\n\nAnswer")]
    q = get_reasoning_parser("qwen3").stream()
    assert q.feed("<th") == []
    assert q.feed("ink>") == []
    assert q.feed("a") == [("reasoning", "a")]
    q = get_reasoning_parser("qwen3").stream()
    assert q.feed("Hi") == [("content", "Hi")]


@pytest.mark.parametrize(
    "name,text,start",
    [
        ("deepseek_r1", "", None),
        ("deepseek_r1", "thinking", None),
        ("deepseek_r1", "thinking</thi", None),
        ("deepseek_r1", "thinking</think>", 16),
        ("deepseek_r1", "<think>a</think>\n{", 16),
        ("qwen3", "", None),
        ("qwen3", "<thi", None),
        ("qwen3", "<think>a", None),
        ("qwen3", "<think>a</think>", 16),
        ("qwen3", "{", 0),
        ("qwen3", "  {", 0),
    ],
)
def test_content_start(name: str, text: str, start: int | None) -> None:
    parser = get_reasoning_parser(name)
    assert parser.content_start(text) == start
    assert parser.content_started(text) is (start is not None)
    if start is not None:
        assert parser.split(text)[1] == (text[start:] or None)
    s = parser.stream()
    s.feed(text)
    assert s.in_content is (start is not None)


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3"])
def test_thinking_disabled(name: str) -> None:
    parser = get_reasoning_parser(name, enable_thinking=False)
    assert parser.split("<think>x</think>y") == (None, "<think>x</think>y")
    assert parser.content_start("") == 0
    assert get_reasoning_parser(name).content_start("") is None


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        get_reasoning_parser("o1")


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3"])
def test_fuzz_stream_matches_split(name: str) -> None:
    """Random mixes of tags, partial tags and text, in random chunkings."""
    rng = random.Random(name)
    pieces = ["<think>", "</think>", "<th", "</thi", "a", " ", "\n", "é<", ">"]
    parser = get_reasoning_parser(name)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        chunks, i = [], 0
        while i < len(text):
            n = rng.randint(1, 5)
            chunks.append(text[i : i + n])
            i += n
        s = parser.stream()
        pieces_out = [p for c in chunks for p in s.feed(c)] + s.finish()
        got = tuple(
            "".join(t for k, t in pieces_out if k == kind) or None
            for kind in ("reasoning", "content")
        )
        assert got == parser.split(text), (text, chunks)
        reasoning, content = got
        assert len(reasoning or "") + len(content or "") <= len(text)
