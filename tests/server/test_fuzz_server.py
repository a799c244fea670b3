"""No request can take the server down, and its text is the tokenizer's, over real HTTP.

Its own real server: the ``deepspeed`` launcher, TP=2, stories260k (fp32, a small KV cache
so the load preempts, and a 256-token context: at the session server's 512 the 600 requests
do not fit the time bound on 2 cores, and its e2e tests need 512). First the exact-text property
through the official ``openai`` client, streamed and not, greedy and sampled.
Then a seeded, time-bounded fuzz: 500+ requests, 16 at a time, drawn from the
whole parameter space with its extremes, including clients that disconnect
mid-stream. Every answer must be 200 or a 4xx JSON error, no stream may carry
an error event, and afterwards the server is healthy, every KV block is free
and no rank has exited.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from tests.helpers.server_helpers import (
    ServerProcess,
    parse_metrics,
    rank_pids,
    sse_events,
    wait_until,
)

FUZZ_REQUESTS = 600
FUZZ_CONCURRENCY = 16
FUZZ_SECONDS = 150  # the loop stops drawing new requests after this


MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("fuzz_logs") / "server.log"
    flags = ("--num-kv-blocks", "96", "--max-model-len", str(MAX_MODEL_LEN))
    proc = ServerProcess.stories_tp2(model_dir, log_path, *flags)
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# -- exact text over HTTP ----------------------------------------------------------------
EXACT_PROMPTS = ["Once upon a time", "The cat", "Lily and Ben went", "One day, a big"]
EXACT_SAMPLING = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0, seed=11)}


def _generated_ids(url: str, prompt_ids: list[int], sampling: dict) -> list[int]:
    body = {"prompt_token_ids": prompt_ids, "max_tokens": 24, "ignore_eos": True, **sampling}
    resp = requests.post(f"{url}/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["outputs"][0]["token_ids"]


@pytest.mark.parametrize("mode", EXACT_SAMPLING)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_text_is_the_tokenizers_decode(server, tokenizer, mode, stream):
    """prompt + completion text == decode(prompt ids + output ids), as OpenAI and vLLM answer."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
    sampling = EXACT_SAMPLING[mode]
    texts = []
    for prompt in EXACT_PROMPTS:
        prompt_ids = tokenizer.encode(prompt)
        output_ids = _generated_ids(server.url, prompt_ids, sampling)
        kwargs = dict(model="stories", prompt=prompt, max_tokens=24, **sampling)
        kwargs["extra_body"] = {"ignore_eos": True}
        if stream:
            chunks = client.completions.create(stream=True, **kwargs)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
        else:
            text = client.completions.create(**kwargs).choices[0].text
        full = tokenizer.decode(prompt_ids + output_ids, skip_special_tokens=True)
        assert prompt + text == full
        texts.append(text)
    assert any(t.startswith(" ") for t in texts)  # a first token's SentencePiece space is kept


def test_echo_returns_the_prompt_as_sent(server):
    body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    plain = requests.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    echoed = requests.post(f"{server.url}/v1/completions", json={**body, "echo": True}, timeout=60)
    assert echoed.status_code == 200, echoed.text
    text = echoed.json()["choices"][0]["text"]
    assert text == "Once upon a time" + plain["choices"][0]["text"]  # no "<s>"


def test_streamed_stop_string_deltas_add_up_to_the_final_text(server):
    """A partial stop-string match is held back until it is ruled out."""
    body = {"model": "stories", "prompt": "Once upon", "max_tokens": 24, "temperature": 0}
    whole = requests.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    free = whole["choices"][0]["text"]  # " a time, there was ..."
    stop = free[3:14]
    body["stop"] = [stop]
    final = requests.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    assert final["choices"][0]["text"] == free[: free.index(stop)]
    with requests.post(
        f"{server.url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=60
    ) as resp:
        events = sse_events(resp.iter_lines())
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert streamed == final["choices"][0]["text"]


# -- the fuzz ------------------------------------------------------------------------
WORDS = ["Once", "upon", "a", "time", "the", "cat", "dog", "Lily", "park", "happy", "ball"]
ODD_TEXT = ["", " ", "\n\n", "Café déjà vu", "日本語", "🙂🚀", "\u200d", "a" * 300]
STOPS = ["a time", "there was", "\n", ".", " the", "e", "🙂", "nothing-like-this", "x" * 256]

# name -> (valid values, extremes included; values that must get a 400)
SAMPLING = {
    "temperature": ([0, 1e-300, 5e-324, 1e-6, 0.5, 1.0, 2.0], [2.5, -1, "hot", float("inf")]),
    "top_p": ([1e-9, 0.3, 1.0], [0, 1.5, float("nan")]),
    "top_k": ([-1, 0, 1, 5, 10**12], [-2, 1.5]),
    "min_p": ([0.0, 0.5, 1.0], [1.1, -0.1]),
    "repetition_penalty": ([0.01, 10.0, 1.0, 1.3], [1e-300, 0, 1e300, -1]),
    "presence_penalty": ([-2, 2, 0.5], [3, float("-inf")]),
    "frequency_penalty": ([-2, 2, -0.5], [float("inf"), 2.0001]),
    "seed": ([None, 0, -1, 2**63, 2**70 + 5], [1.5, "7"]),
    "n": ([1, 2, 4, 16], [17, 0, True]),
    "max_tokens": ([1, 4, 8, 16], [0, 10**9, -3]),
    "min_tokens": ([0, 1, 4], [100, -1]),
    "ignore_eos": ([True, False], ["yes"]),
    "stop_token_ids": ([[], [2], [511, 13], list(range(3, 512))], [[512], [2**63], [-1], ["a"]]),
    "stop": (STOPS + [STOPS[:8], ["a", " the", "."]], ["", [""], STOPS[:9], ["x" * 257], 3]),
}
# Constraints (valid, then ones that must get a 400) for every endpoint, and chat's own.
_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CONSTRAINTS = (
    [
        {"structured_outputs": {"choice": ["yes", "no", "🙂"]}},
        {"structured_outputs": {"regex": "[a-z ]{1,12}"}},
        {
            "structured_outputs": {
                "json": {"type": "object", "properties": {"a": {"type": "integer"}}}
            }
        },
        {"structured_outputs": {"json_object": True}},
        {"structured_outputs": {"grammar": 'start: "a" | "b" "c"*'}},
    ],
    [
        {"structured_outputs": {"regex": "a(b"}},
        {"structured_outputs": {"json": "{"}},
        {"structured_outputs": 5},
        {"structured_outputs": {"choice": []}},
        {"structured_outputs": {"grammar": "start: nowhere"}},
        {"structured_outputs": {"regex": "a", "json_object": True}},
    ],
)
CHAT_CONSTRAINTS = (
    [
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
        {"tools": [_TOOL], "tool_choice": "required"},
        {"tools": [_TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
        {"tools": [_TOOL], "tool_choice": "none"},
    ],
    [
        {"response_format": {"type": "json_schema"}},
        {"tools": [_TOOL], "tool_choice": "auto"},  # this server has no --enable-auto-tool-choice
        {"tool_choice": "required"},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
    ],
)
BAD_PROMPTS = [[], [512], [-1], [2**63], ["a"], None, 5, {"x": 1}, "\ud800", "x\udfff", "a " * 600]


def _prompt(rng: random.Random) -> str | list[int]:
    if rng.random() < 0.2:
        return [rng.randrange(0, 512) for _ in range(rng.randrange(1, 40))]
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 20)))
    return rng.choice(ODD_TEXT) + text if rng.random() < 0.3 else text


def _sampling(rng: random.Random, body: dict) -> None:
    for name, (valid, _) in SAMPLING.items():
        if rng.random() < 0.4:
            body[name] = rng.choice(valid)
    if body.get("min_tokens", 0) > body.get("max_tokens", 16):
        body["min_tokens"] = 0
    if body.get("n", 1) > 4:
        body["max_tokens"] = min(body.get("max_tokens", 4), 4)


def _corrupt(rng: random.Random, path: str, body: dict) -> None:
    """One deliberate error: an invalid value, a bad prompt, a misspelt or unknown field."""
    kind = rng.random()
    if kind < 0.6:
        name = rng.choice(list(SAMPLING))
        body[name] = rng.choice(SAMPLING[name][1])
    elif kind < 0.85:
        bad = rng.choice(BAD_PROMPTS)
        if path == "/v1/chat/completions":
            body["messages"] = [{"role": rng.choice(["user", "tool"]), "content": bad}]
        else:
            body["prompt" if path == "/v1/completions" else "prompt_token_ids"] = bad
    else:
        body[rng.choice(["max_token", "temprature", "best_of", "logit_bias"])] = 1


def _fuzz_request(rng: random.Random) -> tuple[str, dict, bool]:
    """(path, body, disconnect early) drawn from the whole parameter space."""
    endpoint = rng.random()
    body: dict = {}
    if endpoint < 0.5:
        path = "/v1/completions"
        body["model"] = "stories"
        body["prompt"] = _prompt(rng)
        if rng.random() < 0.3:
            body["logprobs"] = rng.choice([0, 1, 5, 20])
        elif rng.random() < 0.15:
            body["echo"] = True
    elif endpoint < 0.8:
        path = "/v1/chat/completions"
        body["model"] = "stories"
        prompt = _prompt(rng)
        content = prompt if isinstance(prompt, str) else "tokens " + str(prompt[:3])
        body["messages"] = [{"role": "user", "content": content}]
        if rng.random() < 0.3:
            body["logprobs"] = True
            body["top_logprobs"] = rng.choice([0, 3, 20])
    else:
        path = "/generate"
        prompt = _prompt(rng)
        body["prompt_token_ids"] = prompt if isinstance(prompt, list) else [1, 403, 407]
        if rng.random() < 0.3:
            body["logprobs"] = rng.choice([0, 3, 20])
    _sampling(rng, body)
    if rng.random() < 0.2:
        valid, invalid = CONSTRAINTS
        if path == "/v1/chat/completions" and rng.random() < 0.5:
            valid, invalid = CHAT_CONSTRAINTS
        body.update(rng.choice(invalid if rng.random() < 0.3 else valid))
    if rng.random() < 0.35:
        _corrupt(rng, path, body)
    stream = rng.random() < 0.45
    if stream:
        body["stream"] = True
        if path != "/generate" and rng.random() < 0.3:
            body["stream_options"] = {"include_usage": True}
    return path, body, stream and rng.random() < 0.25


def _is_json_error(resp: requests.Response) -> bool:
    try:
        error = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str)


def _send(url: str, path: str, body: dict, disconnect: bool, seen: Counter) -> str | None:
    """None if the answer keeps the server's promises, else what was wrong."""
    data = json.dumps(body, allow_nan=True)
    headers = {"Content-Type": "application/json"}
    try:
        with requests.post(
            url + path, data=data, headers=headers, stream=True, timeout=(5, 120)
        ) as resp:
            seen[resp.status_code] += 1
            if resp.status_code != 200:
                if 400 <= resp.status_code < 500 and _is_json_error(resp):
                    return None
                return f"{resp.status_code}: {resp.text[:300]}"
            if not body.get("stream"):
                resp.json()
                return None
            lines = resp.iter_lines()
            if disconnect:
                next(lines, None)
                return None  # the with-block closes the connection mid-stream
            events = sse_events(lines)
    except requests.RequestException as exc:
        return f"connection failed: {exc!r}"
    if not events or events[-1] != "[DONE]":
        return f"stream did not end with [DONE]: {events[-2:]}"
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    return f"error event: {errors[0]}" if errors else None


def test_fuzzed_requests_never_take_the_server_down(server):
    rng = random.Random(20261128)
    drawn = [(_fuzz_request(rng), i) for i in range(FUZZ_REQUESTS)]
    pids = rank_pids(server.proc.pid)
    assert sorted(pids) == [0, 1]
    deadline = time.monotonic() + FUZZ_SECONDS
    problems: list[str] = []
    seen: Counter = Counter()

    def one(item) -> None:
        (path, body, disconnect), i = item
        if time.monotonic() > deadline:
            return
        problem = _send(server.url, path, body, disconnect, seen)
        if problem is not None:
            problems.append(f"#{i} {path} {json.dumps(body)[:300]}: {problem}")

    started = time.monotonic()
    with ThreadPoolExecutor(FUZZ_CONCURRENCY) as pool:
        list(pool.map(one, drawn))
    elapsed = time.monotonic() - started
    assert not problems, "\n".join(problems[:10]) + f"\n{server.log()}"
    assert elapsed < FUZZ_SECONDS + 60, f"the fuzz ran past its bound: {elapsed:.0f} s"
    print(f"fuzz: {sum(seen.values())} requests in {elapsed:.0f} s, statuses {dict(seen)}")
    assert sum(seen.values()) >= 500 and seen[200] >= 150 and seen[400] >= 100, seen

    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200

    def drained() -> bool:
        m = parse_metrics(requests.get(f"{server.url}/metrics", timeout=5).text)
        idle = m["dstp:num_requests_running"] == m["dstp:num_requests_waiting"] == 0
        return idle and m["dstp:kv_cache_usage_perc"] == 0

    assert wait_until(drained, timeout_s=20), requests.get(f"{server.url}/metrics").text
    assert server.proc.poll() is None
    assert rank_pids(server.proc.pid) == pids  # no rank exited or restarted
