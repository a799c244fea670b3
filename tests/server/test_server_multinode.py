"""Two simulated nodes on loopback, 2 ranks each, TP=4 under the real deepspeed launcher.

``deepspeed --hostfile F --no_ssh --node_rank 0|1 --master_addr 127.0.0.1`` is
how a job starts on two machines without ssh; here both "nodes" are this host,
so ranks talk over TCP (gloo) exactly as across hosts. Greedy output must equal
dstp at TP=1 and HF; killing a rank on node 1 must end node 0's launcher too.
"""

from __future__ import annotations

import os
import signal
import time

import openai
import pytest
import requests

from tests.helpers.launcher import DEEPSPEED, free_port
from tests.helpers.server_helpers import ServerProcess, rank_pids
from tests.helpers.tiny_models import STORIES

PROMPTS = ["Once upon a time", "The little dog was sad because", "Tom had a toy car. He"]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    hostfile = tmp / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    port, master_port = free_port(), free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            DEEPSPEED,
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(master_port),
            "launch/serve.py",
            "--model",
            str(STORIES),
            "--dtype",
            "float32",
            "--port",
            str(port),
            "--kv-cache-memory",
            "0.02",
            "--heartbeat-interval",
            "0.5",
        ]
        procs.append(ServerProcess(cmd, port, tmp / f"node{node}.log"))
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
def tp1(nodes):  # nodes: they boot while this computes
    """Greedy token ids and text from dstp's engine at TP=1 (this process)."""
    from dstp.engine.llm_engine import Engine, EngineConfig
    from dstp.engine.sampling_params import SamplingParams

    engine = Engine(EngineConfig(model=str(STORIES), dtype="float32", kv_cache_memory_gib=0.02))
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return [(o.prompt_token_ids, o.outputs[0].token_ids, o.outputs[0].text) for o in outs]


def test_tp4_two_nodes_equals_tp1(nodes, tp1):
    node0, node1 = nodes
    node0.wait_healthy()
    assert requests.get(f"{node0.url}/health", timeout=10).json()["tp_size"] == 4
    assert "ranks span several hosts" in node1.log(100000)  # really the multi-host path
    client = openai.OpenAI(base_url=f"{node0.url}/v1", api_key="none", max_retries=0, timeout=60)
    for prompt, (ids, want_ids, want_text) in zip(PROMPTS, tp1, strict=True):
        got = client.completions.create(
            model=str(STORIES), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        assert got.choices[0].text == want_text
        native = requests.post(
            f"{node0.url}/generate",
            json={"prompt_token_ids": ids, "max_tokens": MAX_TOKENS, "temperature": 0},
            timeout=60,
        ).json()
        assert native["outputs"][0]["token_ids"] == want_ids


def test_rank_dying_on_node1_ends_node0(nodes):
    node0, node1 = nodes
    ranks = rank_pids(node1.proc.pid)
    assert sorted(ranks) == [2, 3], ranks
    t0 = time.monotonic()
    os.kill(ranks[3], signal.SIGKILL)
    code0, code1 = node0.wait_exit(60), node1.wait_exit(30)
    elapsed = time.monotonic() - t0
    assert code0 is not None and code0 != 0, f"node 0 launcher: {code0}\n{node0.log()}"
    assert code1 is not None and code1 != 0
    print(f"both launchers exited non-zero {elapsed:.1f} s after rank 3 was killed")
