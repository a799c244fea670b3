"""Data-parallel replicas (issue 15): W ranks as W/T replicas of TP=T.

Units: the layout's checks and the router. Engine level, W=4 ranks on CPU (plain
processes with the launcher's environment), stories260k at fp32: T=2 x 2 replicas
and T=1 x 4 replicas serve 32 concurrent greedy requests with exactly the text of
one TP=2 engine, using every replica; seeded samples read the same on every
replica; aborting the last replica's requests mid-flight frees that replica's
blocks while the other's keep running; a rank of replica 1 dying stops rank 0
with replica 1 named.
"""

from __future__ import annotations

import json

import pytest

from dstp.engine.sampling_params import SamplingParams
from dstp.replicas import ReplicaLayout, Router
from tests.helpers.launcher import run_ranks
from tests.helpers.tiny_models import STORIES

BASE = [
    "Once upon a time",
    "Lily and Ben went to the park",
    "The little dog was sad because",
    "One day, a big red ball",
    "Tom had a toy car. He",
    "The sun was hot and",
    "Mom said",
    "There was a cat named Tim who liked to",
]
PROMPTS = [f"{p}{tail}" for tail in ("", " and", " with a", ". Then") for p in BASE]  # 32
MAX_TOKENS = 24


# -- units ------------------------------------------------------------------------------
def test_layout_resolves_and_checks():
    layout = ReplicaLayout.resolve(8, tp=2)
    assert layout.num_replicas == 4
    assert list(layout.ranks(1)) == [2, 3] and layout.replica_of(5) == 2
    assert layout.describe(1) == "replica 1 (global ranks 2-3)"
    assert ReplicaLayout.resolve(8, dp=2).tp == 4
    assert ReplicaLayout.resolve(8).num_replicas == 1
    assert ReplicaLayout.resolve(4, tp=1, dp=4).describe(3) == "replica 3 (global rank 3)"
    with pytest.raises(ValueError, match="must divide"):
        ReplicaLayout.resolve(6, tp=4)
    with pytest.raises(ValueError, match="launcher started 8"):
        ReplicaLayout.resolve(8, tp=2, dp=2)
    with pytest.raises(ValueError, match="data-parallel-size 3"):
        ReplicaLayout.resolve(8, dp=3)


def _out(rid, new, finished=False):
    from dstp.engine.outputs import CompletionOutput, RequestOutput

    return RequestOutput(rid, [], [CompletionOutput(0, [], "", new_token_ids=new)], finished)


def test_router_least_outstanding_tokens():
    router = Router(2, block_size=4)
    p = SamplingParams(max_tokens=10)
    assert router.choose([1, 2]) == 0
    router.assign("a", 0, [1, 2], p)  # 2 + 10
    assert router.choose([3]) == 1
    router.assign("b", 1, list(range(3, 40)), p)  # 37 + 10
    assert router.choose([5]) == 0
    router.progress(_out("a", [7]))  # prompt prefilled, one token out: 12 - 3 = 9
    assert router.load == [9, 47]
    router.progress(_out("b", [], finished=True))
    assert router.load == [9, 0] and router.replica_of("b") is None
    assert router.choose([5]) == 1
    # ties rotate, so an idle pool spreads requests over every replica
    idle = Router(3)
    assert [idle.choose([i]) for i in range(6)] == [0, 1, 2, 0, 1, 2]


def test_router_prefix_affinity_when_loads_are_close():
    router = Router(2, block_size=4)
    p = SamplingParams(max_tokens=4)
    shared = list(range(100, 116))  # four blocks
    router.assign("x", 1, shared + [1], p)  # replica 1 caches the prefix; load 21
    router.assign("y", 0, [9] * 10, p)  # load 14
    # replica 1 is 7 tokens busier, the shared prefix is 16 tokens: go there
    assert router.choose(shared + [2, 3]) == 1
    # an unrelated prompt goes to the least loaded
    assert router.choose([7] * 20) == 0
    # far busier than the saved prefill: load wins
    router.assign("z", 1, [8] * 60, SamplingParams(max_tokens=100))
    assert router.choose(shared + [2, 3]) == 0


LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def test_plan_recommends_tp_and_replicas_for_a_device_count(tmp_path, capsys):
    from dstp.__main__ import main
    from dstp.model.loading import load_config
    from dstp.tools.planner import make_plan

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))

    def config():  # fresh each time: building the meta model sets its dtype
        return load_config(str(tmp_path / "config.json"))

    plan = make_plan(config(), 80, devices=8)  # 15 GiB of weights: one device holds it
    assert (plan.recommended, plan.replicas) == (1, 8)
    plan = make_plan(config(), 24, devices=6)  # TP=1 leaves too little KV room
    assert (plan.recommended, plan.replicas) == (2, 3)
    assert "inside one node" in plan.replica_reason
    plan = make_plan(config(), 24, devices=5)  # no fitting TP divides 5
    assert plan.recommended is None and "divides 5 devices" in plan.replica_reason
    assert make_plan(config(), 80).replicas is None  # without --devices: TP only, as before
    assert main(["plan", "--model", str(tmp_path), "--device-memory", "24", "--devices", "8"]) == 0
    out = capsys.readouterr().out
    assert "recommended for 8 devices: TP=2 x 4 replica(s)" in out
    assert "--tensor-parallel-size 2" in out


# -- W=4 on CPU ---------------------------------------------------------------------------


def _single_tp2(tmp) -> list[dict]:
    job = tmp / "single.json"
    engine = {"model": str(STORIES), "dtype": "float32", "kv_cache_memory_gib": 0.02}
    params = [{"max_tokens": MAX_TOKENS, "temperature": 0.0}] * len(PROMPTS)
    job.write_text(
        json.dumps({"scenarios": {"g": {"engine": engine, "prompts": PROMPTS, "params": params}}})
    )
    out = tmp / "single_out.json"
    for proc in run_ranks(
        2, ["tests/helpers/workers/engine_run.py", str(job), str(out)], timeout=300
    ):
        assert proc.returncode == 0, proc.stdout[-4000:]
    return [o[0] for o in json.loads(out.read_text())["g"]["outputs"]]


def _replicas(tmp, tp: int, **extra) -> tuple[dict | None, list]:
    job = tmp / f"job_tp{tp}.json"
    job.write_text(
        json.dumps(
            {"model": str(STORIES), "tp": tp, "max_tokens": MAX_TOKENS, "prompts": PROMPTS, **extra}
        )
    )
    out = tmp / f"out_tp{tp}.json"
    procs = run_ranks(4, ["tests/helpers/workers/replica_run.py", str(job), str(out)], timeout=300)
    return (json.loads(out.read_text()) if out.exists() else None), procs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _single_tp2(tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("tp", [2, 1])
def test_w4_replicas_serve_like_one_tp2_engine(tp, reference, tmp_path):
    results, procs = _replicas(tmp_path, tp)
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank}:\n{proc.stdout[-4000:]}"
    replicas = 4 // tp
    assert results["num_replicas"] == replicas
    assert results["fast_all_reduce"] is False  # shm all-reduce ignores groups: off
    # 32 concurrent greedy requests: exactly one TP=2 engine's text and tokens
    greedy = results["greedy"]
    assert len(greedy) == 32
    for got, want in zip(greedy, reference, strict=True):
        assert got["token_ids"] == want["token_ids"]
        assert got["text"] == want["text"]
    assert {g["replica"] for g in greedy} == set(range(replicas))  # every replica used
    # the same seed reads the same on every replica (n=2: both samples)
    assert set(results["seeded_replicas"]) == set(range(replicas))
    assert all(s == results["seeded"][0] for s in results["seeded"])
    assert results["seeded"][0][0] != results["seeded"][0][1]
    # aborting the last replica's requests frees its blocks, not the others'
    abort = results["abort"]
    last = replicas - 1
    assert abort["victims"] and sorted(abort["victims"]) == abort["aborted"]
    assert all(abort["assigned"][v] == last for v in abort["victims"])
    mid, after, end = abort["mid"], abort["after_abort"], abort["end"]
    assert mid[last]["kv_blocks_free"] < mid[last]["kv_blocks_total"]
    assert after[last]["kv_blocks_free"] == after[last]["kv_blocks_total"]
    assert after[0]["kv_blocks_free"] < after[0]["kv_blocks_total"]  # still generating
    assert all(s["kv_blocks_free"] == s["kv_blocks_total"] for s in end)
    assert all(s["outstanding_requests"] == 0 for s in end)


def test_w4_rank_death_in_replica_1_stops_rank_0_naming_it(tmp_path):
    _, procs = _replicas(tmp_path, 2, kill_rank=3, kill_after_s=3)
    assert procs[3].returncode == 17
    assert procs[0].returncode == 3, procs[0].stdout[-4000:]
    assert "rank 0 saw: replica 1 (global ranks 2-3) failed" in procs[0].stdout
    assert procs[2].returncode != 0  # replica 1's driver saw its group break


# -- HTTP: a real server, deepspeed --num_gpus 4 at TP=2 (2 replicas) ----------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.helpers.launcher import DEEPSPEED, free_port
    from tests.helpers.server_helpers import ServerProcess

    port = free_port()
    cmd = [DEEPSPEED, "--num_gpus", "4", "--master_port", str(free_port()), "launch/serve.py"]
    cmd += ["--model", str(STORIES), "--dtype", "float32", "--port", str(port)]
    cmd += ["--heartbeat-interval", "0.5", "--kv-cache-memory", "0.02"]
    cmd += ["--tensor-parallel-size", "2", "--data-parallel-size", "2"]
    proc = ServerProcess(cmd, port, tmp_path_factory.mktemp("logs") / "server.log")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def url(server, reference):  # reference: computed while the server boots
    server.wait_healthy()
    return server.url


def _metrics(url: str) -> dict[str, float]:
    import requests

    from tests.helpers.server_helpers import parse_metrics

    return parse_metrics(requests.get(f"{url}/metrics", timeout=10).text)


def _per_replica(m: dict[str, float], name: str) -> list[float]:
    found = {k: v for k, v in m.items() if k.startswith(f"dstp_replica_{name}{{")}
    return [found[f'dstp_replica_{name}{{replica="{r}"}}'] for r in range(len(found))]


def _complete(url: str, body: dict) -> str:
    import requests

    from tests.helpers.server_helpers import sse_events

    resp = requests.post(f"{url}/v1/completions", json=body, timeout=120, stream=body["stream"])
    assert resp.status_code == 200, resp.text
    if not body["stream"]:
        return [c["text"] for c in sorted(resp.json()["choices"], key=lambda c: c["index"])]
    texts: dict[int, str] = {}
    for event in sse_events(resp.iter_lines()):
        if event != "[DONE]":
            for choice in event["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return [texts[i] for i in sorted(texts)]


def test_http_32_concurrent_greedy_as_one_tp2_engine_on_every_replica(url, reference):
    from concurrent.futures import ThreadPoolExecutor

    before = _per_replica(_metrics(url), "requests_routed_total")
    bodies = [
        {"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": i % 2 == 1}
        for i, p in enumerate(PROMPTS)
    ]
    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(lambda b: _complete(url, b), bodies))
    assert [t[0] for t in texts] == [r["text"] for r in reference]
    m = _metrics(url)
    routed = _per_replica(m, "requests_routed_total")
    assert len(routed) == 2 and all(a - b >= 8 for a, b in zip(routed, before, strict=True))
    assert _per_replica(m, "up") == [1, 1]
    # seeded n=2 requests read the same whichever replica serves them
    seeded = {"prompt": "Mom said", "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 2}
    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(lambda s: _complete(url, {**seeded, "stream": s}), [False, True] * 2)
        )
    assert all(a == answers[0] for a in answers) and answers[0][0] != answers[0][1]


def test_http_structured_outputs_on_every_replica(url):
    """Constrained requests go to both replicas (each compiles its own matchers); a
    constraint that does not compile is refused by rank 0 before any replica gets it."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    import requests

    before = _per_replica(_metrics(url), "requests_routed_total")
    pattern = r"[a-z]{3,8}-[0-9]{2}"
    bodies = [
        {"prompt": p, "max_tokens": 16, "temperature": 0.8, "seed": i, "stream": i % 2 == 1}
        | {"structured_outputs": {"regex": pattern} if i % 2 else {"choice": ["yes", "no"]}}
        for i, p in enumerate(PROMPTS[:8])
    ]
    with ThreadPoolExecutor(8) as pool:
        texts = [t[0] for t in pool.map(lambda b: _complete(url, b), bodies)]
    for i, text in enumerate(texts):
        assert re.fullmatch(pattern, text) if i % 2 else text in ("yes", "no"), text
    routed = _per_replica(_metrics(url), "requests_routed_total")
    assert all(a > b for a, b in zip(routed, before, strict=True))
    bad = {"prompt": "x", "structured_outputs": {"regex": "a(b"}}
    resp = requests.post(f"{url}/v1/completions", json=bad, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "structured_outputs"


def test_http_disconnect_frees_blocks_on_its_replica(url):
    from tests.helpers.server_helpers import open_stream, wait_until

    def stream():
        body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
        return open_stream(url, {**body, "stream": True})

    first = stream()
    running = _per_replica(_metrics(url), "num_requests_running")
    assert sorted(running) == [0, 1], running
    busy = running.index(1)
    second = stream()  # the least loaded replica: the other one
    assert wait_until(lambda: _per_replica(_metrics(url), "num_requests_running") == [1, 1], 10)
    second.close()
    other = 1 - busy

    def freed() -> bool:
        m = _metrics(url)
        free, total = _per_replica(m, "kv_cache_free_blocks"), _per_replica(m, "kv_cache_blocks")
        return free[other] == total[other] and free[busy] < total[busy]

    assert wait_until(freed, 15)  # the disconnected one's replica, and only it
    first.close()

    def all_free() -> bool:
        m = _metrics(url)
        return _per_replica(m, "kv_cache_free_blocks") == _per_replica(m, "kv_cache_blocks")

    assert wait_until(all_free, 15)
    assert _metrics(url)["dstp:num_requests_in_flight"] == 0


def test_http_rank_death_in_replica_1_stops_the_job_naming_it(server, url):
    """Last: it takes the server down."""
    import os
    import signal
    import time

    from tests.helpers.server_helpers import rank_pids

    ranks = rank_pids(server.proc.pid)
    assert sorted(ranks) == [0, 1, 2, 3], ranks
    t0 = time.monotonic()
    os.kill(ranks[3], signal.SIGKILL)
    code = server.wait_exit(60)
    elapsed = time.monotonic() - t0
    log = server.log(200000)
    assert code is not None and code != 0, f"still running 60 s after rank 3 died:\n{log[-4000:]}"
    assert "replica 1 (global ranks 2-3) failed" in log, log[-4000:]
    print(f"launcher exited with {code} {elapsed:.1f} s after rank 3 (replica 1) was killed")
