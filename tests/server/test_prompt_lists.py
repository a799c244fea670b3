"""vLLM-accepted requests against a real server: ``deepspeed --num_gpus 2 launch/serve.py``
on stories260k (fp32, TP=2) with --enable-log-requests, driven by the official ``openai``
client: prompt lists (one choice per prompt x n, OpenAI's indices, streamed and not),
/tokenize and /detokenize against the tokenizer's own encode/decode, chat_template_kwargs,
continuous usage stats, vLLM-named metrics and the request log line.
"""

from __future__ import annotations

import re

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.server_helpers import sse_events, wait_until

PROMPTS = ["Once upon a time", "Lily and Ben went to the park", "The sun was hot and"]


@pytest.fixture(scope="module")
def server(tp2_server):
    """The session's TP=2 server (conftest.py), which runs with --enable-log-requests."""
    tp2_server.wait_healthy()
    return tp2_server


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def test_prompt_lists_with_the_openai_client(server, tok):
    client = _client(server.url)
    solo = [
        client.completions.create(model="stories", prompt=p, max_tokens=12, temperature=0)
        for p in PROMPTS
    ]
    want = [(i * 2 + j, s.choices[0].text) for i, s in enumerate(solo) for j in range(2)]
    ids = [tok.encode(p) for p in PROMPTS]
    for prompt in (PROMPTS, ids):
        got = client.completions.create(
            model="stories", prompt=prompt, n=2, max_tokens=12, temperature=0
        )
        assert [(c.index, c.text) for c in got.choices] == want
        assert got.usage.prompt_tokens == sum(map(len, ids))
        assert got.usage.completion_tokens == sum(s.usage.completion_tokens for s in solo) * 2
        stream = client.completions.create(
            model="stories", prompt=prompt, n=2, max_tokens=12, temperature=0, stream=True
        )
        texts: dict[int, str] = {}
        for chunk in stream:
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
        assert sorted(texts.items()) == want


def test_tokenize_detokenize_match_the_tokenizer(server, tok):
    for text in PROMPTS + ["  two  spaces", "é and ü"]:
        got = requests.post(f"{server.url}/tokenize", json={"prompt": text}, timeout=30).json()
        assert got["tokens"] == tok.encode(text)
        back = requests.post(f"{server.url}/detokenize", json={"tokens": got["tokens"]}, timeout=30)
        assert back.json()["prompt"] == tok.decode(got["tokens"])


def test_chat_template_kwargs(server, tok):
    messages = [{"role": "user", "content": "Tell me a story."}]

    def rendered(**kw) -> list[int]:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)
        return tok.encode(text, add_special_tokens=False)

    body = {"messages": messages, "chat_template_kwargs": {"shout": True}}
    got = requests.post(f"{server.url}/tokenize", json=body, timeout=30).json()
    assert got["tokens"] == rendered(shout=True) != rendered()
    answer = _client(server.url).chat.completions.create(
        model="stories",
        messages=messages,
        max_tokens=4,
        extra_body={"chat_template_kwargs": {"shout": True}},
    )
    assert answer.usage.prompt_tokens == len(rendered(shout=True))


def test_continuous_usage_stats(server):
    body = {"prompt": PROMPTS[:2], "max_tokens": 6, "stream": True, "ignore_eos": True}
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    resp = requests.post(f"{server.url}/v1/completions", json=body, stream=True, timeout=60)
    chunks = sse_events(resp.iter_lines())[:-1]
    assert chunks and all("usage" in c for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_metrics_and_request_log(server):
    _client(server.url).completions.create(model="stories", prompt=PROMPTS[0], max_tokens=3)
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "dstp:num_requests_running",
        "dstp:num_requests_waiting",
        "dstp:kv_cache_usage_perc",
        "dstp:time_to_first_token_seconds",
        "dstp:e2e_request_latency_seconds",
        "dstp:request_queue_time_seconds",
        "dstp:request_success",
        "dstp:num_preemptions",
        "dstp:prefix_cache_queries",
        "dstp:prefix_cache_hits",
        "process_cpu_seconds",
    ):
        assert name in fams, name
    running = fams["dstp:num_requests_running"].samples[0]
    assert running.labels == {"model_name": "stories"} and running.value == 0
    queries = fams["dstp:prefix_cache_queries"].samples[0].value
    assert queries > 0  # in tokens, as vLLM counts them
    line = re.compile(r"request \S+: status=ok finish_reason=\w+ prompt_tokens=\d+ output_tokens=")
    assert wait_until(lambda: line.search(server.log(200_000)) is not None, 10), server.log()
