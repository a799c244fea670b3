"""Single-process properties of the parallel layers (TP=1 group)."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from dstp.distributed import get_tp
from dstp.model.layers import ParallelLMHead, split_units


def test_lm_head_on_a_strided_last_token_view_copies_no_weight():
    """HF calls the head on ``hidden[:, -1:, :]``; that must stay one GEMM, not a weight copy per row."""
    vocab, hidden, batch = 4096, 512, 8
    dtype = torch.bfloat16  # the copying bmm path is taken for bf16 weights
    head = ParallelLMHead(vocab, hidden, False, get_tp(), dtype=dtype, device="cpu")
    head.weight.data.normal_()
    states = torch.randn(batch, 16, hidden, dtype=dtype)[:, -1:, :]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logits = head(states)
    allocated = sum(max(0, e.cpu_memory_usage) for e in prof.key_averages())
    weight_bytes = head.weight.numel() * head.weight.element_size()
    assert allocated < weight_bytes, (
        f"allocated {allocated} B: the {weight_bytes} B weight was copied"
    )
    expected = states @ head.weight.t()
    assert torch.allclose(logits.float(), expected.float(), rtol=2e-2, atol=2e-1)


def test_split_units_replicates_kv_heads_when_ranks_outnumber_them():
    # 2 KV heads of 8 rows over 4 ranks: ranks 0,1 hold head 0; ranks 2,3 head 1
    assert [split_units(0, 2, 8, r, 4) for r in range(4)] == [(0, 8), (0, 8), (8, 8), (8, 8)]
    # 8 heads over 4 ranks: 2 consecutive heads each
    assert [split_units(100, 8, 4, r, 4) for r in range(4)] == [
        (100, 8),
        (108, 8),
        (116, 8),
        (124, 8),
    ]


def test_single_row_bf16_linear_uses_aten_and_restores_onednn():
    from dstp.cpu.kernels import linear_2d

    weight = torch.randn(64, 32, dtype=torch.bfloat16)
    x = torch.randn(1, 1, 32, dtype=torch.bfloat16)
    before = torch._C._get_mkldnn_enabled()
    out = linear_2d(x, weight)
    assert torch._C._get_mkldnn_enabled() == before
    assert out.shape == (1, 1, 64)
    assert torch.allclose(out.float(), (x.float() @ weight.float().t()), atol=0.1, rtol=0.02)
