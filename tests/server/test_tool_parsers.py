"""Tool-call parsers: real output formats of each family, streaming in every split equal to
the whole-text result, and the llguidance grammars that force each format."""

from __future__ import annotations

import json
import random
import re

import pytest

from dstp.server.tool_calls import CallDelta, ContentDelta, ToolParser, get_parser

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "filters": {
                    "type": "object",
                    "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
                },
            },
            "required": ["query"],
        },
    },
}
TOOLS = [WEATHER, SEARCH]

# (parser, output, expected content, expected [(name, arguments as dict)])
CASES = [
    # Qwen2.5 / Hermes: content before, two calls, unicode, nested arguments.
    (
        "hermes",
        'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", '
        '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "search", "arguments": '
        '{"query": "天气", "filters": {"tags": ["news", "météo"]}}}\n</tool_call>',
        "Let me check both.\n",
        [
            ("get_weather", {"city": "Zürich", "unit": "celsius"}),
            ("search", {"query": "天气", "filters": {"tags": ["news", "météo"]}}),
        ],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    # A block whose JSON is broken stays content verbatim; the good one still counts.
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>\n'
        '<tool_call>\n{"name": "search", "arguments": {"query": "x"}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>\n',
        [("search", {"query": "x"})],
    ),
    # Cut off before </tool_call>: a complete JSON still counts (as vLLM), a partial one not.
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}',
        None,
        [("get_weather", {"city": "Oslo"})],
    ),
    (
        "hermes",
        'Sure <tool_call>\n{"name": "get_weather", "arguments": {"ci',
        'Sure <tool_call>\n{"name": "get_weather", "arguments": {"ci',
        [],
    ),
    ("hermes", "The answer is 4 < 5, no tool needed.", "The answer is 4 < 5, no tool needed.", []),
    # Llama 3.1 / 3.2 JSON.
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "San Francisco", "unit": "fahrenheit"}}',
        None,
        [("get_weather", {"city": "San Francisco", "unit": "fahrenheit"})],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Kyōto"}}; '
        '{"name": "search", "parameters": {"query": "a; b", "filters": {"tags": []}}}',
        None,
        [
            ("get_weather", {"city": "Kyōto"}),
            ("search", {"query": "a; b", "filters": {"tags": []}}),
        ],
    ),
    ("llama3_json", "It is sunny: {not json}", "It is sunny: {not json}", []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    (
        "llama3_json",
        '{"name": "search", "parameters": {"query": "x"}} and then some text',
        "and then some text",
        [("search", {"query": "x"})],
    ),
    # Mistral: list form (tokenizer <= v7) and name{args} form (v11+).
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lyon"}}, '
        '{"name": "search", "arguments": {"query": "ß", "filters": {"tags": ["a"]}}}]',
        None,
        [("get_weather", {"city": "Lyon"}), ("search", {"query": "ß", "filters": {"tags": ["a"]}})],
    ),
    (
        "mistral",
        'I will look. [TOOL_CALLS]get_weather{"city": "Nice"}[TOOL_CALLS]search[ARGS]{"query": "q"}',
        "I will look. ",
        [("get_weather", {"city": "Nice"}), ("search", {"query": "q"})],
    ),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "search", "arguments": "{\\"query\\": \\"s\\"}"}]',
        None,
        [("search", {"query": "s"})],
    ),
    ("mistral", "[TOOL_CALLS] hello there", "[TOOL_CALLS] hello there", []),
    ("mistral", "[TOOL_CALLS][1, 2] x", "[TOOL_CALLS][1, 2] x", []),
    # Pythonic (Llama 3.2 / 4).
    (
        "pythonic",
        '[get_weather(city="São Paulo", unit="celsius"), search(query=\'x\', '
        'filters={"tags": ["a", "b"]})]',
        None,
        [
            ("get_weather", {"city": "São Paulo", "unit": "celsius"}),
            ("search", {"query": "x", "filters": {"tags": ["a", "b"]}}),
        ],
    ),
    (
        "pythonic",
        '<|python_start|>[search(query="]", filters={"n": None, "ok": True, "t": (1, 2.5)})]'
        "<|python_end|>",
        None,
        [("search", {"query": "]", "filters": {"n": None, "ok": True, "t": [1, 2.5]}})],
    ),
    ("pythonic", "[f(x=true, y=null)]\n", None, [("f", {"x": True, "y": None})]),
    ("pythonic", "[1] See the reference.", "[1] See the reference.", []),
    ("pythonic", "[f(__import__('os'))]", "[f(__import__('os'))]", []),
    ("pythonic", "[f(x=open('/etc/passwd'))]", "[f(x=open('/etc/passwd'))]", []),
    ("pythonic", "The weather is fine.", "The weather is fine.", []),
]


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("name,text,content,expected", CASES)
def test_extract(name: str, text: str, content: str | None, expected: list) -> None:
    got_content, calls = get_parser(name).extract(text)
    assert got_content == content
    assert _calls(calls) == expected
    for c in calls:
        assert isinstance(json.loads(c.arguments), dict)


def _stream(parser: ToolParser, chunks: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Feed ``chunks``; check the OpenAI delta shape; return (content, [(name, arguments)])."""
    s = parser.stream()
    deltas = [d for c in chunks for d in s.feed(c)] + s.finish()
    content, calls = "", []
    for d in deltas:
        if isinstance(d, ContentDelta):
            assert d.text
            content += d.text
        elif d.id is not None:
            assert d.index == len(calls) and d.name
            calls.append([d.name, d.arguments])
        else:
            assert d.name is None and d.index == len(calls) - 1
            calls[-1][1] += d.arguments
    return content or None, [tuple(c) for c in calls]


def _splits(text: str) -> list[list[str]]:
    rng = random.Random(len(text))
    out = [list(text), [text]]
    for _ in range(6):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


@pytest.mark.parametrize("name,text,content,expected", CASES)
def test_stream_matches_extract(name: str, text: str, content: str | None, expected) -> None:
    parser = get_parser(name)
    whole_content, whole_calls = parser.extract(text)
    want = (whole_content, [(c.name, c.arguments) for c in whole_calls])
    for chunks in _splits(text):
        assert _stream(parser, chunks) == want, chunks


def test_stream_releases_content_and_calls_early() -> None:
    """Content is not held to the end, and a call goes out as soon as it closes."""
    s = get_parser("hermes").stream()
    assert s.feed("Hello <tool") == [ContentDelta("Hello ")]
    assert s.feed('_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>') == [
        CallDelta(0, s.calls[0].id, "f", '{"a": 1}')
    ]
    assert s.feed("\nBye") == [ContentDelta("Bye")]
    p = get_parser("pythonic").stream()
    assert p.feed("Plain") == [ContentDelta("Plain")]


def test_call_ids() -> None:
    _, calls = get_parser("hermes").extract(CASES[0][1])
    assert all(re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", c.id) for c in calls)
    assert calls[0].id != calls[1].id
    _, calls = get_parser("mistral").extract(CASES[11][1])
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c.id) for c in calls)


def test_get_parser_names() -> None:
    for name in ("hermes", "llama3_json", "mistral", "pythonic"):
        assert get_parser(name).name == name
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, pythonic"):
        get_parser("qwen")


# --- grammars ---------------------------------------------------------------------------

# (parser, a call in the grammar's exact form, the same call to an unknown function)
GRAMMAR_CASES = {
    "hermes": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}'
        "\n</tool_call>",
        '<tool_call>\n{"name": "get_time", "arguments": {"city": "Zürich"}}\n</tool_call>',
    ),
    "llama3_json": (
        '{"name": "get_weather", "parameters": {"city": "Zürich", "unit": "celsius"}}',
        '{"name": "get_time", "parameters": {"city": "Zürich"}}',
    ),
    "mistral": (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}]',
        '[TOOL_CALLS][{"name": "get_time", "arguments": {"city": "Zürich"}}]',
    ),
    "pythonic": (
        '[get_weather(city="Zürich", unit="celsius")]',
        '[get_time(city="Zürich")]',
    ),
}
SECOND_CALL = {
    "hermes": '\n<tool_call>\n{"name": "search", "arguments": {"query": "q", "filters": '
    '{"tags": ["x"]}}}\n</tool_call>',
    "llama3_json": '; {"name": "search", "parameters": {"query": "q", "filters": {"tags": ["x"]}}}',
    "mistral": ', {"name": "search", "arguments": {"query": "q", "filters": {"tags": ["x"]}}}]',
    "pythonic": ', search(query="q", filters={"tags": ["x"]})]',
}


@pytest.fixture(scope="module")
def llg():
    import llguidance
    import llguidance.hf as llg_hf

    from dstp.model.default_model import build_tokenizer

    tok = build_tokenizer()  # byte-level: every string has a token path
    return llguidance, tok, llg_hf.from_tokenizer(tok)


def _accepts(llg, grammar: str, text: str) -> bool:
    llguidance, tok, lltok = llg
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    ok = matcher.consume_tokens(tok.encode(text, add_special_tokens=False))
    return bool(ok) and matcher.is_accepting()


@pytest.mark.parametrize("name", sorted(GRAMMAR_CASES))
def test_grammars(llg, name: str) -> None:
    llguidance = llg[0]
    parser = get_parser(name)
    good, unknown = GRAMMAR_CASES[name]
    required, named = parser.required_grammar(TOOLS), parser.named_grammar(WEATHER)
    for grammar in (required, named):
        assert llguidance.LLMatcher.validate_grammar(grammar) == "", grammar
        assert _accepts(llg, grammar, good)
        assert not _accepts(llg, grammar, unknown)
        assert not _accepts(llg, grammar, good.replace('"Zürich"', "1"))  # schema type
        assert not _accepts(llg, grammar, good.replace('"celsius"', '"kelvin"'))  # enum
    # Compact JSON: no free whitespace inside the arguments.
    assert not _accepts(llg, required, good.replace('"Zürich", ', '"Zürich",  '))
    # required: several calls of any tool; named: exactly one call of that tool.
    two = (
        good[:-1] + SECOND_CALL[name]
        if name in ("mistral", "pythonic")
        else good + SECOND_CALL[name]
    )
    assert _accepts(llg, required, two)
    assert not _accepts(llg, named, two)
    assert not _accepts(llg, parser.named_grammar(SEARCH), good)
    # What the grammar forces parses back to the call.
    assert _calls(parser.extract(good)[1]) == [
        ("get_weather", {"city": "Zürich", "unit": "celsius"})
    ]
    assert [c.name for c in parser.extract(two)[1]] == ["get_weather", "search"]


def test_pythonic_grammar_optional_arguments(llg) -> None:
    """Optional keyword arguments may be left out, but order and names are fixed."""
    parser = get_parser("pythonic")
    tool = {
        "name": "f",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}, "c": {}},
        },
    }
    grammar = parser.named_grammar(tool)
    for text in [
        "[f()]",
        "[f(a=1)]",
        "[f(b=true)]",
        "[f(a=1, c=null)]",
        '[f(a=1, b=false, c="x")]',
    ]:
        assert _accepts(llg, grammar, text), text
        assert parser.extract(text)[1][0].name == "f"
    for text in ["[f(b=true, a=1)]", "[f(d=1)]", "[f(, a=1)]", "[f(a=1,)]"]:
        assert not _accepts(llg, grammar, text), text


@pytest.mark.parametrize(
    "name,text",
    [
        ("hermes", '<tool_call>\n{"name": "f", "arguments": {"x": NaN}}\n</tool_call>'),
        ("llama3_json", '{"name": "f", "parameters": {"x": Infinity}}'),
        ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"x": -Infinity}}]'),
        ("pythonic", "[f(x=1e999)]"),
        ("pythonic", "[f(x={1, 2})]"),
        ("pythonic", "[f(x=b'raw')]"),
        ("pythonic", "[f(1)]"),
        ("pythonic", "[f(**kw)]"),
        ("hermes", "<tool_call>" + "[" * 100_000 + "</tool_call>"),
        ("pythonic", "[f(x=" + "[" * 100_000 + "])]"),
    ],
)
def test_not_json_arguments_stay_content(name: str, text: str) -> None:
    """Arguments must be valid JSON objects: NaN, sets, bytes, positionals are no call."""
    assert get_parser(name).extract(text) == (text, [])


def test_long_pythonic_stream_parses_each_bracket_once(monkeypatch) -> None:
    """Many "]" inside a long call list, fed a few chars at a time, parse each "]" once."""
    from dstp.server.tool_calls import pythonic

    parsed: list[str] = []
    real = pythonic.parse_call_list
    monkeypatch.setattr(pythonic, "parse_call_list", lambda t: parsed.append(t) or real(t))
    text = "[search(query=" + repr("[x] " * 500) + ")]"
    s = get_parser("pythonic").stream()
    deltas = [d for i in range(0, len(text), 3) for d in s.feed(text[i : i + 3])] + s.finish()
    assert [d.name for d in deltas] == ["search"]
    assert len(parsed) == text.count("]")


def test_special_token_marker(llg) -> None:
    """A marker that is a special token ([TOOL_CALLS] in Mistral's tokenizers) is matched
    by id: llguidance never matches special tokens by their text."""
    llguidance, tok, lltok = llg
    special = tok.convert_tokens_to_ids("<|system|>")  # stands in for [TOOL_CALLS]
    grammar = get_parser("mistral").named_grammar(WEATHER, token_ids={"[TOOL_CALLS]": special})
    assert f"<[{special}]>" in grammar
    body = '[{"name": "get_weather", "arguments": {"city": "Rome"}}]'
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    assert matcher.consume_tokens([special, *tok.encode(body, add_special_tokens=False)])
    assert matcher.is_accepting()
    assert not _accepts(llg, grammar, "[TOOL_CALLS]" + body)


def test_openai_shapes() -> None:
    s = get_parser("hermes").stream()
    (first,) = s.feed('<tool_call>\n{"name": "f", "arguments": {"a": "é"}}\n</tool_call>')
    assert first.to_openai() == {
        "index": 0,
        "id": s.calls[0].id,
        "type": "function",
        "function": {"name": "f", "arguments": '{"a": "é"}'},
    }
    assert CallDelta(0, None, None, "}").to_openai() == {"index": 0, "function": {"arguments": "}"}}
    assert s.calls[0].to_openai()["function"] == {"name": "f", "arguments": '{"a": "é"}'}


FUZZ_PIECES = {
    "hermes": [
        "Hi ",
        "<tool_call>",
        "</tool_call>",
        "\n",
        '{"name": "f", "arguments": {"a": [1, "<tool_call>"]}}',
        '{"name": "g"}',
        '{"name": 1}',
        "<tool_",
        " é ",
        '<tool_call>\n{"name": "h", "arguments": {"k": "v"}}\n</tool_call>',
    ],
    "llama3_json": [
        " ",
        "<|python_tag|>",
        '{"name": "f", "parameters": {"a": {"b": null}}}',
        "; ",
        '{"name": "g", "arguments": "{}"}',
        '{"x": 1}',
        "{",
        "text",
        "<|py",
    ],
    "mistral": [
        "Ok ",
        "[TOOL_CALLS]",
        '[{"name": "f", "arguments": {"a": "]"}}]',
        'f{"a": 1}',
        "g[ARGS]",
        '{"b": []}',
        "[TOOL_",
        "[",
        " ",
        "x",
    ],
    "pythonic": [
        "[",
        'f(a="]", b=[1, 2])',
        ", ",
        "g()",
        "]",
        "<|python_start|>",
        "<|python_end|>",
        " text",
        "(",
        "\n",
        "[f(a=1), g()]",
        '<|python_start|>[g(x="é")]<|python_end|>',
    ],
}


@pytest.mark.parametrize("name", sorted(FUZZ_PIECES))
def test_fuzz_stream_matches_extract(name: str) -> None:
    """Random mixes of calls, markers, broken pieces and text, in random chunkings."""
    rng = random.Random(name)
    parser, pieces = get_parser(name), FUZZ_PIECES[name]
    for _ in range(150):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 7)))
        content, calls = parser.extract(text)
        for c in calls:
            assert isinstance(json.loads(c.arguments), dict)
        want = (content, [(c.name, c.arguments) for c in calls])
        chunks, i = [], 0
        while i < len(text):
            n = rng.randint(1, 6)
            chunks.append(text[i : i + n])
            i += n
        assert _stream(parser, chunks) == want, (text, chunks)
