"""Structured outputs and tool calling through the real TP=2 server, with the official client.

The session's shared server (stories260k, fp32, TP=2, ``--tool-call-parser hermes
--enable-auto-tool-choice``; tests/server/conftest.py), whose chat template renders tools,
assistant calls and tool results. Oracles: ``jsonschema`` and ``re`` for validity, the
tokenizer's own chat template for what the model saw, the same requests unconstrained for
what a constraint must leave alone, and the unstreamed answer for the streamed one.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pydantic
import pytest
import requests
from transformers import AutoTokenizer

from tests.helpers.schemas import PERSON
from tests.helpers.server_helpers import openai_client

MODEL = "stories"
CHAT = [{"role": "user", "content": "Tell me about a girl named Lily."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "local"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=99)


@pytest.fixture(scope="module")
def url(tp2_server):
    tp2_server.wait_healthy()
    return tp2_server.url


@pytest.fixture(scope="module")
def client(url):
    return openai_client(url, timeout=120)


def person_format() -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


def chat(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=CHAT, **{"max_tokens": 120, **kw})


def streamed_chat(client, **kw) -> tuple[str, list[dict], str]:
    """(content, tool calls assembled from their deltas, finish_reason) of a streamed chat."""
    content, calls, reason = "", {}, None
    for chunk in chat(client, stream=True, **kw):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                if d.id:
                    assert not call["name"], "id and name come first, once"
                    call["id"], call["name"] = d.id, d.function.name
                call["arguments"] += d.function.arguments or ""
            reason = choice.finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


def valid_calls(message) -> list[tuple[str, dict]]:
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]
    for (name, args), call in zip(calls, message.tool_calls, strict=True):
        jsonschema.validate(args, SCHEMAS[name])
        assert call.type == "function" and re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", call.id)
    return calls


def test_json_schema_greedy_sampled_and_streamed(client):
    greedy = chat(client, temperature=0, response_format=person_format())
    text = greedy.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert greedy.choices[0].finish_reason == "stop"
    sampled = chat(client, temperature=1.0, seed=11, n=3, response_format=person_format())
    for choice in sampled.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    streamed, _, reason = streamed_chat(client, temperature=0, response_format=person_format())
    assert (streamed, reason) == (text, "stop")
    obj = chat(client, temperature=0, response_format={"type": "json_object"}, max_tokens=60)
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_parse_with_a_pydantic_model_and_constrained_logprobs(client):
    answer = client.chat.completions.parse(
        model=MODEL, messages=CHAT, max_tokens=120, temperature=0, response_format=Person
    )
    assert isinstance(answer.choices[0].message.parsed, Person)
    lp = chat(client, temperature=0, response_format=person_format(), logprobs=True, top_logprobs=5)
    first = lp.choices[0].logprobs.content[0]
    assert first.token == "{" and first.logprob == pytest.approx(0.0, abs=1e-6)
    assert [t.token for t in first.top_logprobs] == ["{"]  # forbidden tokens are left out


def test_completions_choice_and_regex(client):
    colors = ["red", "green", "blue"]
    out = client.completions.create(
        model=MODEL,
        prompt=["The color of the sky is", "Her dress was"],
        max_tokens=10,
        temperature=0.8,
        seed=3,
        n=2,
        extra_body={"structured_outputs": {"choice": colors}},
    )
    assert len(out.choices) == 4 and all(c.text in colors for c in out.choices)
    pattern = r"[0-9]{2}:[0-9]{2} (am|pm)"
    out = client.completions.create(
        model=MODEL,
        prompt="The clock said",
        max_tokens=20,
        temperature=0,
        extra_body={"structured_outputs": {"regex": pattern}},
    )
    assert re.fullmatch(pattern, out.choices[0].text) and out.choices[0].finish_reason == "stop"


def test_constrained_and_free_requests_in_one_batch(client):
    prompts = ["Once upon a time", "The dog ran", "Tom and Sue", "A big red ball"]

    def free(prompt):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        return out.choices[0].text

    def constrained(prompt):
        body = {"structured_outputs": {"json": PERSON}}
        out = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=120, temperature=0, extra_body=body
        )
        return json.loads(out.choices[0].text)

    alone = [free(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        frees = [pool.submit(free, p) for p in prompts]
        objects = [pool.submit(constrained, p) for p in prompts]
        assert [f.result() for f in frees] == alone
        for obj in objects:
            jsonschema.validate(obj.result(), PERSON)


def test_named_and_required_tool_calls_always_parse(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    answer = chat(client, temperature=0, tools=TOOLS, tool_choice=named)
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls"
    assert [name for name, _ in valid_calls(message)] == ["get_weather"]
    assert not message.content
    for seed in (1, 2):
        answer = chat(client, temperature=1.0, seed=seed, tools=TOOLS, tool_choice="required")
        assert valid_calls(answer.choices[0].message), answer  # one or more, each valid
    # streamed: id and name first, then the arguments; equal to the unstreamed call
    content, calls, reason = streamed_chat(client, temperature=0, tools=TOOLS, tool_choice=named)
    assert reason == "tool_calls" and not content
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in message.tool_calls
    ]


def test_auto_parses_free_output_and_none_leaves_it_alone(client):
    auto = chat(client, temperature=0, tools=TOOLS, max_tokens=30)  # auto: the server's default
    plain = chat(client, temperature=0, tools=TOOLS, tool_choice="none", max_tokens=30)
    # stories260k writes stories, not calls: the parser finds none and the text is content
    assert auto.choices[0].message.tool_calls is None
    assert auto.choices[0].message.content == plain.choices[0].message.content
    assert auto.choices[0].finish_reason in ("stop", "length")


def test_tool_result_round_trip_reaches_the_template(client, url, model_dir):
    named = {"type": "function", "function": {"name": "get_weather"}}
    call = chat(client, temperature=0, tools=TOOLS, tool_choice=named).choices[0].message
    messages = [
        *CHAT,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [c.model_dump() for c in call.tool_calls],
        },
        {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "sunny, 21 degrees"},
    ]
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    assert answer.choices[0].message.content
    tok = AutoTokenizer.from_pretrained(model_dir)
    for_template = json.loads(json.dumps(messages))
    for c in for_template[1]["tool_calls"]:  # templates get arguments as objects
        c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    for_template[1]["content"] = ""
    text = tok.apply_chat_template(
        for_template, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert (
        "tools: get_weather, get_time" in text
        and "<tool_call>" in text
        and "(chatcmpl-tool-" in text
    )
    assert answer.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format",
        ),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        (
            {"structured_outputs": {"json": PERSON}, "response_format": person_format()},
            "response_format",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
            "tools",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_bad_constraints_and_tools_are_400_naming_the_field(url, body, param):
    resp = requests.post(
        f"{url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, **body}, timeout=30
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.text
