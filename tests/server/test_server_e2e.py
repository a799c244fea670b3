"""End to end: the server under the real ``deepspeed --num_gpus 2`` launcher, real weights.

The session's shared server (stories260k at fp32, TP=2; tests/server/conftest.py). The official
``openai`` client calls completions and chat completions, streaming and not;
greedy text must equal Hugging Face ``generate`` and dstp's engine at TP=1.
Then 40 concurrent clients mixing valid and invalid requests, a mid-stream
disconnect, the admission limit saturated with long streams (429 beyond it, /health and
/metrics still < 1 s), and last: killing rank 1 must end the launcher non-zero in < 60 s.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from tests.helpers.server_helpers import (
    open_stream,
    parse_metrics,
    rank_pids,
    sse_events,
    wait_until,
)
from tests.server.conftest import TP2_ADMISSION_LIMIT

PROMPTS = [
    "Once upon a time",
    "Lily and Ben went to the park",
    "The little dog was sad because",
    "One day, a big red ball",
    "Tom had a toy car. He",
    "The sun was hot and",
    "Mom said",
    "There was a cat named Tim who liked to",
]
MAX_TOKENS = 24
# the shared server's --max-queued-requests: > the 30 valid requests of the mixed test
ADMISSION_LIMIT = TP2_ADMISSION_LIMIT
CHAT = [{"role": "user", "content": "Tell me a story about a frog."}]


@pytest.fixture(scope="module")
def server(tp2_server):
    """The session's TP=2 server (conftest.py); it may still be booting."""
    return tp2_server


@pytest.fixture(scope="module")
def references(model_dir, server):  # server: boots meanwhile
    """Greedy continuations from HF generate and from dstp's engine at TP=1 (this process)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dstp.engine.llm_engine import Engine, EngineConfig
    from dstp.engine.sampling_params import SamplingParams

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    chat_ids = tok.encode(
        tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )
    prompts = [tok.encode(p) for p in PROMPTS] + [chat_ids]

    def hf_text(ids: list[int]) -> tuple[list[int], str]:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
        new = out[0, len(ids) :].tolist()
        if new and new[-1] == tok.eos_token_id:
            new = new[:-1]
        full = tok.decode(ids + new, skip_special_tokens=True)
        return new, full[len(tok.decode(ids, skip_special_tokens=True)) :]

    hf_out = [hf_text(ids) for ids in prompts]
    engine = Engine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_memory_gib=0.02))
    eng_out = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return {
        "ids": prompts,
        "hf": hf_out,
        "engine": [(o.outputs[0].token_ids, o.outputs[0].text) for o in eng_out],
    }


@pytest.fixture(scope="module")
def url(server):
    server.wait_healthy()
    return server.url


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def _strip_eos(ids: list[int], eos: int = 2) -> list[int]:
    return ids[:-1] if ids and ids[-1] == eos else ids


def test_references_agree(references):
    """The oracle itself: dstp TP=1 tokens equal HF's for every prompt."""
    for (hf_ids, _), (eng_ids, _) in zip(references["hf"], references["engine"], strict=True):
        assert _strip_eos(eng_ids) == hf_ids


def test_completions_greedy_equals_hf_and_engine(url, references):
    client = _client(url)
    for i, prompt in enumerate(PROMPTS[:4]):
        got = client.completions.create(
            model="stories", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        assert got.choices[0].text == references["engine"][i][1]
        assert got.choices[0].text.strip() == references["hf"][i][1].strip()
        streamed = client.completions.create(
            model="stories", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in streamed) == got.choices[0].text


def test_chat_greedy_equals_hf(url, references):
    client = _client(url)
    want_engine, want_hf = references["engine"][-1][1], references["hf"][-1][1]
    got = client.chat.completions.create(
        model="stories", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0
    )
    assert got.choices[0].message.content == want_engine
    assert got.choices[0].message.content.strip() == want_hf.strip()
    stream = client.chat.completions.create(
        model="stories", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want_engine


def test_generate_token_ids_equal_hf(url, references):
    ids = references["ids"][1]
    got = requests.post(
        f"{url}/generate",
        json={"prompt_token_ids": ids, "max_tokens": MAX_TOKENS, "temperature": 0},
        timeout=60,
    ).json()
    assert _strip_eos(got["outputs"][0]["token_ids"]) == references["hf"][1][0]


def test_models_and_context_limit(url):
    models = _client(url).models.list()
    assert models.data[0].id == "stories"
    resp = requests.post(
        f"{url}/v1/completions", json={"prompt": "hello " * 600, "max_tokens": 4}, timeout=30
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"


def _metrics(url: str) -> dict[str, float]:
    return parse_metrics(requests.get(f"{url}/metrics", timeout=10).text)


def test_concurrent_clients_mixed(url, references):
    """40 clients at once; a quarter invalid. Each valid one is answered once, exactly."""
    rng = random.Random(1)
    invalid = [
        {"prompt": "x", "max_tokens": 0},
        {"prompt": "x", "temperature": -1},
        {"prompt": "x", "bogus": 1},
        {"prompt": "x", "top_p": 7},
        {"prompt": "hello " * 600},
    ]
    jobs = []
    for i in range(40):
        if i % 4 == 3:
            jobs.append(("bad", rng.choice(invalid)))
        else:
            k = rng.randrange(len(PROMPTS))
            jobs.append(
                (
                    k,
                    {
                        "prompt": PROMPTS[k],
                        "max_tokens": MAX_TOKENS,
                        "temperature": 0,
                        "stream": i % 2 == 0,
                    },
                )
            )

    def run(job):
        kind, body = job
        resp = requests.post(
            f"{url}/v1/completions", json=body, stream=body.get("stream", False), timeout=120
        )
        if kind != "bad" and body.get("stream"):
            return resp.status_code, sse_events(resp.iter_lines())
        return resp.status_code, resp.json()

    before = _metrics(url)  # the server is shared: count this test's own requests
    t0 = time.monotonic()
    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(run, jobs))
    elapsed = time.monotonic() - t0
    ids = set()
    for (kind, body), (status, payload) in zip(jobs, results, strict=True):
        if kind == "bad":
            assert status == 400 and payload["error"]["message"], payload
            continue
        assert status == 200, payload
        want = references["engine"][kind][1]
        if body["stream"]:
            assert payload[-1] == "[DONE]"
            assert "".join(c["choices"][0]["text"] for c in payload[:-1]) == want
            ids.add(payload[0]["id"])
        else:
            assert payload["choices"][0]["text"] == want
            ids.add(payload["id"])
    assert len(ids) == sum(kind != "bad" for kind, _ in jobs)
    print(f"40 concurrent clients served in {elapsed:.1f} s")
    assert wait_until(lambda: _metrics(url)["dstp:num_requests_in_flight"] == 0, 10)
    m = _metrics(url)
    assert m["dstp:kv_cache_usage_perc"] == 0, "KV blocks leaked"
    assert m["dstp:num_requests_running"] == 0 and m["dstp:num_requests_waiting"] == 0
    bad = 'http_requests_total{handler="/v1/completions",method="POST",status="400"}'
    assert m[bad] - before.get(bad, 0) >= 10
    hits = "dstp:prefix_cache_hits_total"
    long_prompt = " ".join(PROMPTS)  # several whole KV blocks, which the prefix cache shares
    for _ in range(2):
        body = {"prompt": long_prompt, "max_tokens": 1}
        assert requests.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    assert _metrics(url)[hits] > before[hits]  # identical prompts share blocks
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


def test_disconnect_mid_stream_frees_blocks(url):
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    sock = open_stream(url, body)
    assert _metrics(url)["dstp:num_requests_running"] == 1
    sock.close()
    assert wait_until(lambda: _metrics(url)["dstp:num_requests_in_flight"] == 0, 15)
    m = _metrics(url)
    assert m["dstp:kv_cache_usage_perc"] == 0
    assert m["dstp:generation_tokens_total"] > 0
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


def test_admission_limit_and_fast_health_under_saturated_generation(url):
    """Every admitted request a long stream: one more gets 429 + Retry-After at once, and
    /health and /metrics answer in < 1 s while generation runs flat out."""
    body = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "stream": True}
    socks = []
    latencies: dict[str, list[float]] = {"/health": [], "/metrics": [], "429": []}
    try:
        for _ in range(ADMISSION_LIMIT):  # not read: the server's socket buffers take it
            socks.append(open_stream(url, body, events=0))
        assert wait_until(
            lambda: _metrics(url)["dstp:num_requests_in_flight"] == ADMISSION_LIMIT, 30
        )
        before = _metrics(url)
        for _ in range(5):
            for path in ("/health", "/metrics"):
                t0 = time.monotonic()
                resp = requests.get(f"{url}{path}", timeout=10)
                latencies[path].append(time.monotonic() - t0)
                assert resp.status_code == 200
            t0 = time.monotonic()
            resp = requests.post(
                f"{url}/v1/completions", json={"prompt": "Mom said", "max_tokens": 8}, timeout=10
            )
            latencies["429"].append(time.monotonic() - t0)
            assert resp.status_code == 429, resp.text
            assert int(resp.headers["Retry-After"]) >= 1
            assert resp.json()["error"]["code"] == "queue_full"
            time.sleep(0.2)
        after = _metrics(url)
        assert after["dstp:num_requests_in_flight"] == ADMISSION_LIMIT  # saturated throughout
        assert after["dstp:num_requests_running"] > 0
        assert after["dstp:generation_tokens_total"] > before["dstp:generation_tokens_total"]
        print(
            "under saturation, max latency: "
            + ", ".join(f"{k} {max(v) * 1000:.0f} ms" for k, v in latencies.items())
        )
        for kind, values in latencies.items():
            assert max(values) < 1.0, (kind, values)
    finally:
        for sock in socks:
            sock.close()
    assert wait_until(lambda: _metrics(url)["dstp:num_requests_in_flight"] == 0, 30)
    m = _metrics(url)
    assert m["dstp:kv_cache_usage_perc"] == 0
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


@pytest.mark.kills_tp2_server
def test_killing_rank1_ends_launcher_nonzero(server, url):
    """Last of the shared server's users (conftest.py orders it): it takes the server down."""
    ranks = rank_pids(server.proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    import os
    import signal

    t0 = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    code = server.wait_exit(60)
    elapsed = time.monotonic() - t0
    assert code is not None, f"launcher still running 60 s after rank 1 died:\n{server.log()}"
    assert code != 0
    print(f"launcher exited with {code} {elapsed:.1f} s after rank 1 was killed")
    assert wait_until(lambda: not _alive(ranks[0]), 30), "rank 0 outlived the launcher"


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
