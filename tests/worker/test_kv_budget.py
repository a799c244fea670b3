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


# -- the worst step beyond the profiled one -------------------------------------------
def _worst(**overrides):
    dims = dict(
        max_num_seqs=4,
        max_model_len=100,  # 112 once padded to whole blocks of 16
        max_num_batched_tokens=64,
        block_size=16,
        local_heads=8,
        local_kv_heads=2,
        k_head_dim=16,
        v_head_dim=8,
        dtype_bytes=2,
        vocab_size=1000,
    )
    dims.update(overrides)
    return kv_budget.worst_step(**dims)


def test_worst_step_by_byte_accounting():
    worst = _worst()
    # decode: 4 seqs x 112 tokens x 2 KV heads x (16 + 8) dims x 2 bytes, then two fp32
    # score tensors of 8 heads x 4 seqs x 112 keys
    assert worst.decode_gather == 4 * 112 * 2 * 24 * 2 + 2 * 8 * 4 * 112 * 4
    # continued prefill: a 64-token chunk against 100 keys: the [64, 100] bool mask, and per
    # each of the 4 query heads of a KV head its bool copy, a negated copy and a 2-byte one;
    # plus the context's K/V (100 tokens x 2 heads x 24 dims x 2 bytes)
    assert worst.prefill_mask == 64 * 100 * (1 + 4 * (2 + 2)) + 100 * 2 * 24 * 2
    assert worst.sampler == 4 * 1000 * kv_budget.SAMPLER_BYTES_PER_LOGIT
    assert worst.nbytes == max(worst.decode_gather, worst.prefill_mask) + worst.sampler


def test_soft_capped_or_windowed_models_count_the_explicit_scores():
    """Gemma 2 / Mistral continued prefills go through _masked_prefill: fp32 scores [H, q,
    ctx] and their copy, the probabilities in the model's dtype, the bool mask, and K and V
    repeated to every query head."""
    plain, explicit = _worst(), _worst(explicit_scores=True)
    scores = 8 * 64 * 100 * (2 * 4 + 2) + 64 * 100 + 8 * 100 * 24 * 2
    assert explicit.prefill_mask == max(plain.prefill_mask, scores + 100 * 2 * 24 * 2)
    assert explicit.prefill_mask > plain.prefill_mask
    assert (explicit.decode_gather, explicit.sampler) == (plain.decode_gather, plain.sampler)


def test_which_models_count_explicit_scores():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig

    from dstp.worker.model_runner import _softcaps_or_windows

    assert _softcaps_or_windows(Gemma2Config())
    assert _softcaps_or_windows(MistralConfig(sliding_window=4096))
    assert not _softcaps_or_windows(LlamaConfig())


def test_the_chunk_is_at_most_the_context():
    assert (
        _worst(max_num_batched_tokens=8192).prefill_mask
        == _worst(max_num_batched_tokens=100).prefill_mask
    )


def test_worst_step_of_llama_70b_at_tp8_and_128k():
    """The issue's case: 64 sequences, one at 128K, 8 of 64 query heads and 1 of 8 KV heads
    per rank, bf16. Gathered whole, 4 GiB of K/V and 0.5 GiB of scores; in groups under
    the decode byte cap, 7 sequences of 72 MiB at a time. An 8.3 GiB mask for a 2,048-token
    chunk, a quarter GiB of sampler rows."""
    worst = _worst(
        max_num_seqs=64,
        max_model_len=131072,
        max_num_batched_tokens=2048,
        local_heads=8,
        local_kv_heads=1,
        k_head_dim=128,
        v_head_dim=128,
        dtype_bytes=2,
        vocab_size=128256,
    )
    per_seq = 131072 * 256 * 2 + 2 * 8 * 131072 * 4  # K/V of one sequence, its two scores
    assert per_seq * 64 == 4 * GIB + GIB // 2  # what one group of all 64 would gather
    assert worst.decode_gather == 7 * per_seq == 504 * 2**20
    assert worst.prefill_mask == 2048 * 131072 * (1 + 8 * 4) + 131072 * 256 * 2
    assert round(worst.sampler / GIB, 2) == 0.24


def test_device_budget_leaves_room_for_the_worst_step_and_names_its_terms():
    worst = kv_budget.WorstStep(3 * GIB, 5 * GIB, GIB, ("d", "m", "s"))
    budget = kv_budget.device_budget(80 * GIB, 20 * GIB, 2 * GIB, 0.9, worst)
    assert budget.nbytes == 72 * GIB - 20 * GIB - 2 * GIB - (5 + 1) * GIB
    for term in ("3.00 GiB batched decode (d)", "5.00 GiB continued-prefill mask (m)"):
        assert term in budget.reason
    assert "1.00 GiB sampler (s)" in budget.reason


def test_device_budget_keeps_the_cuda_graphs_pool_and_names_it():
    budget = kv_budget.device_budget(80 * GIB, 20 * GIB, 2 * GIB, 0.9, None, GIB // 2)
    assert budget.nbytes == 72 * GIB - 22 * GIB - GIB // 2
    assert "512.0 MiB kept by --cuda-graphs" in budget.reason
    assert "cuda-graphs" not in kv_budget.device_budget(80 * GIB, 20 * GIB, GIB, 0.9).reason
