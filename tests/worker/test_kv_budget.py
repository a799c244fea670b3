"""KV-cache sizing: vLLM's device contract, the CPU default, and the profiled step."""

from __future__ import annotations

import pytest
import torch

from dstp.engine.llm_engine import Engine, EngineConfig
from dstp.worker import kv_budget
from tests.helpers.tiny_models import STORIES, llama_config, save_random_model

GIB = 2**30


def test_device_budget_is_utilization_less_use_and_peak():
    budget = kv_budget.device_budget(80 * GIB, 20 * GIB, 3 * GIB, 0.9)
    assert budget.nbytes == 72 * GIB - 23 * GIB
    assert "--gpu-memory-utilization 0.9" in budget.reason
    assert kv_budget.device_budget(80 * GIB, 75 * GIB, GIB, 0.9).nbytes == 0


def test_host_budget_takes_what_is_needed_up_to_a_share():
    small = kv_budget.host_budget(16 * GIB, 2, wanted_tokens=1000, bytes_per_token=1024)
    assert small.nbytes == 1000 * 1024
    assert "max_num_seqs x max_model_len" in small.reason
    big = kv_budget.host_budget(16 * GIB, 2, wanted_tokens=10**9, bytes_per_token=1024)
    assert big.nbytes == int(16 * GIB * kv_budget.CPU_MEMORY_FRACTION) // 2
    assert "--kv-cache-memory" in big.fix


@pytest.mark.parametrize("tokens,max_len,max_seqs", [(2048, 512, 64), (100, 4096, 8), (50, 7, 3)])
def test_profile_plan_is_a_valid_step(tokens, max_len, max_seqs):
    bs = 16
    plan = kv_budget.profile_plan(tokens, max_len, max_seqs, bs)
    lengths = plan.context_lens.tolist()
    assert sum(lengths) == min(tokens, max_len * max_seqs)
    assert max(lengths) <= max_len and len(lengths) <= max_seqs
    assert plan.num_tokens == sum(lengths)
    slots = plan.slot_mapping
    assert slots.unique().numel() == slots.numel()  # no two tokens share a slot
    assert int(slots.max()) < kv_budget.profile_blocks(plan) * bs
    for i, n in enumerate(lengths):  # each token's slot is where its block table puts it
        a = int(plan.query_starts[i])
        pos = plan.positions[a : a + n]
        assert torch.equal(pos, torch.arange(n))
        want = plan.block_tables[i, pos // bs] * bs + pos % bs
        assert torch.equal(slots[a : a + n], want)


def test_the_profile_step_runs_and_leaves_the_cache_alone(tmp_path):
    config = llama_config(num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    path = save_random_model(config, tmp_path / "m")
    engine = Engine(EngineConfig(str(path), dtype="float32", max_num_batched_tokens=600))
    cache = engine.runner.cache
    logits = engine.runner.run_profile_step(engine.config)
    assert logits.shape == (3, 128)  # 600 tokens as sequences of <= 256 (the position limit)
    assert torch.isfinite(logits).all()
    assert engine.runner.cache is cache


def test_cpu_default_holds_every_sequence_at_full_context():
    engine = Engine(EngineConfig(str(STORIES), dtype="float32", max_num_seqs=8))
    runner = engine.runner
    assert runner.num_blocks * runner.block_size == 8 * 512  # 8 seqs x the model's 512
    assert runner.max_model_len == 512
    assert "max_num_seqs x max_model_len" in runner.kv_budget.reason
