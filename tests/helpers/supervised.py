"""A supervised server's test requests and its engine job's ranks (tests/server/test_supervised*.py).

14 requests that must come back the same across an engine restart (completions, chat and
/generate; greedy and seeded; streamed and not; ``n=2``; stop strings), run on threads at
once, and the hooks that kill or stop a rank while they are in flight.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import psutil
import requests

from tests.helpers.server_helpers import get_json, openai_client, parse_metrics, wait_until

MODEL = "stories"
PROMPTS = ["Once upon a time", "Lily and Ben went to the park", "The little dog was sad because"]
CHAT = [{"role": "user", "content": "Tell me a story about a frog."}]


def completion(client, prompt: str, stream: bool, **kw) -> dict:
    """A completion's texts, finish reasons and usage (streamed ones assembled from deltas)."""
    if not stream:
        r = client.completions.create(model=MODEL, prompt=prompt, **kw)
        return {
            "texts": {c.index: c.text for c in r.choices},
            "finish": {c.index: c.finish_reason for c in r.choices},
            "usage": (r.usage.prompt_tokens, r.usage.completion_tokens),
        }
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(
        model=MODEL, prompt=prompt, stream=True, stream_options={"include_usage": True}, **kw
    ):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        if chunk.usage is not None:
            usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
    return {"texts": texts, "finish": finish, "usage": usage}


def chat(client, **kw) -> dict:
    text, finish, usage = "", None, None
    for chunk in client.chat.completions.create(
        model=MODEL, messages=CHAT, stream=True, stream_options={"include_usage": True}, **kw
    ):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
        if chunk.usage is not None:
            usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
    return {"text": text, "finish": finish, "usage": usage}


def generate(url: str, prompt_ids: list[int], stream: bool, **kw) -> dict:
    """/generate's token ids per choice (streamed: the new_token_ids concatenated)."""
    body = {"prompt_token_ids": prompt_ids, "stream": stream, **kw}
    r = requests.post(f"{url}/generate", json=body, stream=stream, timeout=600)
    if r.status_code != 200:
        return {"status": r.status_code, "body": r.text}
    if not stream:
        return {"ids": {o["index"]: o["token_ids"] for o in r.json()["outputs"]}}
    ids: dict[int, list[int]] = {}
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            for o in json.loads(line[6:]).get("outputs", []):
                ids.setdefault(o["index"], []).extend(o["new_token_ids"])
    return {"ids": ids}


def requests_of(url: str, long: int = 300):
    """The 14 requests: name -> a call returning what must not change across a crash (the
    longer ones ask for ``long`` tokens, the others two thirds of it)."""
    client = openai_client(url, timeout=600)
    seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 1234}
    short = long * 2 // 3
    return {
        "greedy": lambda: completion(client, PROMPTS[0], False, max_tokens=long, temperature=0),
        "greedy2": lambda: completion(client, PROMPTS[1], False, max_tokens=long, temperature=0),
        "seeded": lambda: completion(client, PROMPTS[0], False, max_tokens=long, **seeded),
        "seeded2": lambda: completion(client, PROMPTS[2], False, max_tokens=long, **seeded),
        "stream_greedy": lambda: completion(
            client, PROMPTS[2], True, max_tokens=long, temperature=0
        ),
        "stream_seeded": lambda: completion(client, PROMPTS[1], True, max_tokens=long, **seeded),
        "n2": lambda: completion(client, PROMPTS[0], False, max_tokens=short, n=2, **seeded),
        "stream_n2": lambda: completion(client, PROMPTS[1], True, max_tokens=short, n=2, **seeded),
        # stop strings met ~110 and ~170 tokens in: later than every kill hook fires
        "stop": lambda: completion(
            client, PROMPTS[0], True, max_tokens=long, temperature=0, stop=["Tim", "help"]
        ),
        "stop_seeded": lambda: completion(
            client, PROMPTS[2], False, max_tokens=long, stop=["grass"], **seeded
        ),
        "chat": lambda: chat(client, max_tokens=short, temperature=0),
        "chat_seeded": lambda: chat(client, max_tokens=short, **seeded),
        "generate": lambda: generate(url, [1, 400, 300, 200], False, max_tokens=long, **seeded),
        "generate_stream": lambda: generate(url, [1, 500, 60], True, max_tokens=long, **seeded),
    }


def run_all(url: str, extra=None, during=None, long: int = 300, only=None) -> dict[str, object]:
    """Every request (or those named in ``only``) on its own thread; ``during()`` runs once
    they are all in flight."""
    calls = requests_of(url, long)
    if only is not None:
        calls = {name: calls[name] for name in only}
    if extra:
        calls.update(extra)
    results: dict[str, object] = {}

    def run(name):
        try:
            results[name] = calls[name]()
        except Exception as exc:  # kept: the assertions name it
            results[name] = exc

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in calls]
    for t in threads:
        t.start()
    if during is not None:
        during()
    for t in threads:
        t.join(600)
    return results


def engine_ranks(frontend_pid: int) -> dict[int, psutil.Process]:
    """{rank: process} of the front-end's engine job."""
    ranks = {}
    for child in psutil.Process(frontend_pid).children(recursive=True):
        try:
            env = child.environ()
            if "-m" in child.cmdline() and "dstp" in child.cmdline() and "RANK" in env:
                ranks[int(env["RANK"])] = child
        except psutil.Error:
            continue
    return ranks


def rank_killer(server, rank: int):
    """A call that SIGKILLs ``rank`` and returns when it did: the process is found now, so
    the kill itself takes no time (a request could finish while the ranks were looked up)."""
    ranks = engine_ranks(server.proc.pid)
    assert rank in ranks, f"no rank {rank} under the front-end: {ranks}"

    def kill() -> float:
        ranks[rank].send_signal(signal.SIGKILL)
        return time.monotonic()

    return kill


def recovered(server, since: float) -> float:
    """Seconds from ``since`` until /health is 200 again (after it left 200)."""
    assert wait_until(lambda: get_json(f"{server.url}/health")[0] == 503, 30, 0.05), server.log()
    assert get_json(f"{server.url}/health")[1] == {"status": "recovering"}
    assert wait_until(lambda: get_json(f"{server.url}/health")[0] == 200, 300, 0.2), server.log()
    return time.monotonic() - since


def in_flight_then(server, count: int, kill):
    """A ``during`` hook: once ``count`` requests are in flight on the server, ``kill()``."""

    def in_flight() -> bool:
        text = requests.get(f"{server.url}/metrics", timeout=5).text
        return parse_metrics(text).get("dstp:num_requests_in_flight", 0) >= count

    def during():
        assert wait_until(in_flight, 60, 0.02), "the requests never were in flight together"
        kill()

    return during


def same_as(reference: dict, results: dict, skip=()) -> None:
    for name, want in reference.items():
        if name in skip:
            continue
        assert results[name] == want, f"{name}: {results[name]!r} != {want!r}"
