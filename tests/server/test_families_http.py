"""A family served in 2026 through the real server: DeepSeek-V3 (MLA with K and V heads of
different sizes, q_lora, routed and shared experts with sigmoid grouped routing) at TP=2
under the ``deepspeed`` launcher, checked over HTTP against HF fp32.

The engine-level proofs of every family, at TP 2 and 4, are tests/policies; this one shows
the whole path a user takes (the documented command, no extra flags, a checkpoint written
by transformers' own ``save_pretrained``, concurrent requests batched by the server):
greedy tokens equal HF's, and chosen and top-4 logprobs are within 1e-4 of HF's.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers.hf_reference import greedy_continuations, load_reference, logprob_rows
from tests.helpers.launcher import DEEPSPEED, free_port
from tests.helpers.policy_models import build_architectures
from tests.helpers.server_helpers import ServerProcess

FAMILY = "deepseek_v3"
PROMPTS = [[1] + [(11 * i + 7 * j) % 200 + 3 for j in range(2 + 7 * i)] for i in range(4)]
NEW, TOP = 10, 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_architectures(tmp_path_factory.mktemp("family"), [FAMILY])[FAMILY]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    port = free_port()
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launch/serve.py"]
    cmd += ["--model", str(checkpoint), "--dtype", "float32", "--port", str(port)]
    proc = ServerProcess(cmd, port, tmp_path_factory.mktemp("family_logs") / "server.log")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def reference(checkpoint, server):  # server: boots meanwhile
    model = load_reference(checkpoint)
    tokens = greedy_continuations(model, PROMPTS, NEW)
    return tokens, [logprob_rows(model, p, t) for p, t in zip(PROMPTS, tokens, strict=True)]


def generate(url: str, prompt: list[int]) -> dict:
    body = {"prompt_token_ids": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True}
    resp = requests.post(f"{url}/generate", json={**body, "logprobs": TOP}, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["outputs"][0]


def test_deepseek_v3_over_http_equals_hf(server, reference):
    server.wait_healthy()
    tokens, rows = reference
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # one batch: the engine's batched path
        outputs = list(pool.map(lambda p: generate(server.url, p), PROMPTS))
    for i, (out, want, hf) in enumerate(zip(outputs, tokens, rows, strict=True)):
        assert out["token_ids"] == want, f"prompt {i}"
        for step, entry in enumerate(out["logprobs"]):
            where = f"prompt {i} step {step}"
            assert entry["logprob"] == pytest.approx(hf[step, want[step]].item(), abs=1e-4), where
            top = sorted(entry["top"].values(), reverse=True)
            assert top == pytest.approx(hf[step].topk(TOP).values.tolist(), abs=1e-4), where
