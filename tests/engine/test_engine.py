"""The engine (paged KV cache, continuous batching, sampling) against HF ``generate``.

One launch per TP size runs every scenario (TP=2 through the real deepspeed
launcher). Greedy outputs must equal HF's for each prompt alone, whatever the
batching, chunking, preemption and prefix caching did.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.hf_reference import greedy_continuations, load_reference
from tests.helpers.launcher import run_deepspeed, run_ranks
from tests.helpers.tiny_models import LLAMA_VARIANTS, STORIES, llama_config, save_random_model

NEW = 20
# 10 prompts, 3 to 70 tokens: several blocks each, different lengths
PROMPTS = [[1] + [(7 * i + 3 * j) % 190 + 5 for j in range(2 + 7 * i)] for i in range(10)]
SHARED = [(11 * j) % 180 + 5 for j in range(48)]  # a 3-block common prefix
SHARED_PROMPTS = [[1, *SHARED, 20 + i, 30 + i] for i in range(6)]


def greedy(max_tokens=NEW):
    return {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}


def seeded(seed):
    return {
        "max_tokens": 12,
        "temperature": 0.9,
        "top_p": 0.9,
        "top_k": 40,
        "seed": seed,
        "n": 3,
        "ignore_eos": True,
        "logprobs": 2,
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    paths = {
        "gqa_kv2": save_random_model(
            llama_config(**LLAMA_VARIANTS["gqa_kv2_replicated"]), root / "gqa"
        )
    }
    paths["stories"] = STORIES
    return paths


def scenarios(models):
    out = {}
    for name, path in models.items():
        base = {"model": str(path), "dtype": "float32", "num_blocks": 256}
        out[f"{name}/batch"] = {
            "engine": base,
            "prompts": PROMPTS,
            "params": [greedy()] * len(PROMPTS),
        }
        out[f"{name}/preempt"] = {
            "engine": {**base, "num_blocks": 12, "max_num_batched_tokens": 40},
            "prompts": PROMPTS,
            "params": [greedy()] * len(PROMPTS),
        }
        out[f"{name}/no_prefix_cache"] = {
            "engine": {**base, "enable_prefix_caching": False, "max_num_seqs": 3},
            "prompts": SHARED_PROMPTS,
            "params": [greedy(8)] * len(SHARED_PROMPTS),
        }
        out[f"{name}/prefix_cache"] = {
            "engine": {**base, "max_num_seqs": 3},
            "prompts": SHARED_PROMPTS,
            "params": [greedy(8)] * len(SHARED_PROMPTS),
        }
        out[f"{name}/abort"] = {
            "engine": {**base, "num_blocks": 40},
            "prompts": PROMPTS,
            "params": [greedy()] * len(PROMPTS),
            "abort_after_steps": 3,
        }
    path = next(iter(models.values()))
    for run in ("a", "b"):
        out[f"seeded/{run}"] = {
            "engine": {"model": str(path), "dtype": "float32", "num_blocks": 64},
            "prompts": PROMPTS[:4],
            "params": [seeded(1234 + i) for i in range(4)],
        }
    return out


@pytest.fixture(scope="module")
def hf_greedy(models):
    refs = {}
    for name, path in models.items():
        model = load_reference(path)
        refs[(name, "plain")] = greedy_continuations(model, PROMPTS, NEW)
        refs[(name, "shared")] = greedy_continuations(model, SHARED_PROMPTS, 8)
    return refs


_RESULTS: dict[int, dict] = {}


@pytest.fixture(scope="module")
def run_tp(models, tmp_path_factory):
    def run(tp: int) -> dict:
        if tp not in _RESULTS:
            tmp = tmp_path_factory.mktemp(f"tp{tp}")
            job = tmp / "job.json"
            job.write_text(json.dumps({"scenarios": scenarios(models)}))
            args = ["tests/helpers/workers/engine_run.py", str(job), str(tmp / "out.json")]
            if tp == 2:
                proc = run_deepspeed(2, args, timeout=600)
                assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
            else:
                for proc in run_ranks(tp, args, timeout=600):
                    assert proc.returncode == 0, proc.stdout[-4000:]
            _RESULTS[tp] = json.loads((tmp / "out.json").read_text())
        return _RESULTS[tp]

    return run


def tokens(record):
    return [sample[0]["token_ids"] for sample in record["outputs"]]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_continuous_batching_matches_hf(tp, run_tp, models, hf_greedy):
    results = run_tp(tp)
    for name in models:
        assert tokens(results[f"{name}/batch"]) == hf_greedy[(name, "plain")], f"{name} TP={tp}"
        assert results[f"{name}/batch"]["all_blocks_free"]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_preemption_keeps_outputs(tp, run_tp, models, hf_greedy):
    results = run_tp(tp)
    for name in models:
        record = results[f"{name}/preempt"]
        assert record["stats"]["num_preemptions"] > 0, "cache too small must force preemption"
        assert tokens(record) == hf_greedy[(name, "plain")], f"{name} TP={tp}"
        assert record["all_blocks_free"]


@pytest.mark.parametrize("tp", [1, 2])
def test_prefix_caching_hits_and_is_exact(tp, run_tp, models, hf_greedy):
    results = run_tp(tp)
    for name in models:
        on, off = results[f"{name}/prefix_cache"], results[f"{name}/no_prefix_cache"]
        assert tokens(on) == tokens(off) == hf_greedy[(name, "shared")]
        assert on["stats"]["prefix_cache_hits"] >= 3 * (len(SHARED_PROMPTS) - 3)
        assert off["stats"]["prefix_cache_hits"] == 0
        assert on["all_blocks_free"] and off["all_blocks_free"]


@pytest.mark.parametrize("tp", [1, 2])
def test_abort_frees_blocks(tp, run_tp, models, hf_greedy):
    results = run_tp(tp)
    for name in models:
        record = results[f"{name}/abort"]
        assert record["aborted"] == sorted(f"r{i}" for i in range(5))
        assert record["all_blocks_free"]
        assert record["stats"]["num_running"] == record["stats"]["num_waiting"] == 0


def test_seeded_sampling_reproducible_across_runs_and_tp(run_tp):
    one, two = run_tp(1), run_tp(2)
    a = one["seeded/a"]["outputs"]
    assert a == one["seeded/b"]["outputs"], "same seed, same process: same samples"
    assert [[s["token_ids"] for s in o] for o in a] == [
        [s["token_ids"] for s in o] for o in two["seeded/a"]["outputs"]
    ]
    for request in a:
        assert len(request) == 3  # n=3 samples
        assert len({tuple(s["token_ids"]) for s in request}) > 1, "n samples should differ"
        for sample in request:
            assert len(sample["logprobs"]) == len(sample["token_ids"])
            assert all(len(lp[2]) == 2 and lp[1] <= 0 for lp in sample["logprobs"])
