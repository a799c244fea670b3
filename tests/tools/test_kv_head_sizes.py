"""``dstp plan`` and ``dstp inspect`` size the KV cache with K's and V's own head sizes.

DeepSeek-V2/V3's MLA caches K heads of ``qk_nope + qk_rope`` (24 in the tiny config) and
V heads of ``v_head_dim`` (16): both tools show the two sizes and count K + V per head, as
the engine's paged cache (``CacheShape.bytes_per_token``) allocates them. Where K and V
are one size (Llama) nothing changes: no extra line, ``2 * head_dim`` per head.
"""

from __future__ import annotations

import pytest
import torch

from dstp.model.loading import load_config
from tests.helpers.policy_models import make_config
from tests.helpers.tiny_models import llama_config


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    path = tmp_path_factory.mktemp("deepseek_v2")
    make_config("deepseek_v2").save_pretrained(path)
    return path


def _cache_bytes(layers: int, kv_heads: int, k: int, v: int, dtype: torch.dtype) -> int:
    from dstp.worker.kv_cache import CacheShape

    return CacheShape(layers, kv_heads, k, v, 16, dtype).bytes_per_token


def test_plan_counts_k_and_v_head_sizes(deepseek):
    from dstp.tools.planner import format_plan, make_plan

    plan = make_plan(load_config(str(deepseek)), 1, dtype="bfloat16")
    assert (plan.k_head_dim, plan.v_head_dim) == (24, 16)
    by_tp = {o.tp: o for o in plan.options}
    # 3 layers, 4 KV heads (MLA expands the latent to every query head) split over TP
    for tp, local_kv in ((1, 4), (2, 2), (4, 1)):
        want = 3 * local_kv * (24 + 16) * 2
        assert by_tp[tp].kv_bytes_per_token == want
        assert want == _cache_bytes(3, local_kv, 24, 16, torch.bfloat16)
    text = format_plan(plan)
    assert "K and V heads differ: K 24, V 16 per head (config.v_head_dim)" in text


def test_inspect_shows_both_head_sizes_and_kv_bytes(deepseek, capsys):
    from dstp.__main__ import main

    assert main(["inspect", "--model", str(deepseek), "--tp", "2", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "2/4 KV (each KV head on 1 rank(s)), head sizes K 24, V 16 (config.v_head_dim)" in out
    want = _cache_bytes(3, 2, 24, 16, torch.float32)
    assert want == 960
    assert (
        f"KV cache bytes per token per rank (float32): {want:,} "
        "(3 layers x 2 KV heads x (K 24 + V 16) x 4 bytes)" in out
    )


def test_same_head_sizes_keep_one_head_dim(tmp_path, capsys):
    from dstp.__main__ import main
    from dstp.tools.planner import format_plan, make_plan

    llama_config(num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    config = load_config(str(tmp_path))
    plan = make_plan(config, 1, dtype="bfloat16")
    head_dim = config.hidden_size // 4
    assert plan.k_head_dim == plan.v_head_dim == head_dim
    layers = config.num_hidden_layers
    assert {o.tp: o.kv_bytes_per_token for o in plan.options}[2] == 2 * layers * 1 * head_dim * 2
    assert "K and V heads differ" not in format_plan(plan)
    assert main(["inspect", "--model", str(tmp_path), "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert f"head_dim {head_dim}" in out and "head sizes" not in out
    assert f"(K {head_dim} + V {head_dim})" in out
