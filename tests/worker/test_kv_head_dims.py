"""A paged KV cache whose K and V head sizes differ (DeepSeek's MLA: K 192, V 128).

The cache's shapes and bytes count both sizes; a prefill, a continued prefill and
batched decodes through the attention backends (K head dim 24, V 16, as the tiny
DeepSeek-V2) match plain fp32 attention over each sequence's whole history.
"""

from __future__ import annotations

import pytest
import torch

from dstp.worker.attention.backends import LayerAttention
from dstp.worker.attention.backends import cpu as cpu_backend
from dstp.worker.attention.backends.sdpa import SdpaBackend
from dstp.worker.attention.metadata import AttentionMetadata
from dstp.worker.kv_cache import CacheShape, PagedKVCache
from dstp.worker.step_inputs import StepUploader
from dstp.worker.step_plan import StepPlan

DK, DV, KV, HEADS, BS = 24, 16, 2, 4, 4


def _shape(dtype=torch.float32, dk=DK, dv=DV, layers=3) -> CacheShape:
    return CacheShape(
        num_layers=layers,
        local_kv_heads=KV,
        k_head_dim=dk,
        v_head_dim=dv,
        block_size=BS,
        dtype=dtype,
    )


def test_cache_shapes_and_bytes_count_both_head_sizes():
    shape = _shape(torch.bfloat16)
    assert shape.bytes_per_token == 3 * KV * (DK + DV) * 2
    assert _shape(torch.bfloat16, 16, 16).bytes_per_token == 2 * 3 * KV * 16 * 2  # as before
    assert shape.blocks_for(10 * shape.bytes_per_token * BS + 1) == 10
    cache = PagedKVCache(shape, 5, torch.device("cpu"))
    k, v = cache.layer(1)
    assert k.shape == (KV, 5 * BS, DK) and v.shape == (KV, 5 * BS, DV)
    assert cache.nbytes == 5 * BS * shape.bytes_per_token
    k.normal_()
    v.normal_()
    cache.copy_blocks(torch.tensor([[1, 3]]))
    assert torch.equal(k[:, 3 * BS : 4 * BS], k[:, BS : 2 * BS])
    assert torch.equal(v[:, 3 * BS : 4 * BS], v[:, BS : 2 * BS])
    with pytest.raises(ValueError, match="no block"):
        PagedKVCache(shape, 0, torch.device("cpu"))


def test_the_cpu_kernel_takes_unequal_head_sizes_in_multiples_of_8():
    q = torch.zeros(HEADS, 1, 64, dtype=torch.bfloat16)
    k = torch.zeros(KV, 16, 64, dtype=torch.bfloat16)
    assert cpu_backend.fits(q, k, k)
    assert cpu_backend.fits(q, k, k[..., :32])
    assert not cpu_backend.fits(q, k, k[..., :36])


def _plan(tables: torch.Tensor, before: list[int], new: list[int]) -> StepPlan:
    """One step: sequence s has ``before[s]`` tokens cached and ``new[s]`` arriving."""
    positions = torch.cat([torch.arange(b, b + n) for b, n in zip(before, new, strict=True)])
    seq = torch.repeat_interleave(torch.arange(len(new)), torch.tensor(new))
    slots = tables[seq, positions // BS] * BS + positions % BS
    starts = torch.tensor([0, *new]).cumsum(0)
    return StepPlan(
        input_ids=torch.zeros(len(positions), dtype=torch.long),
        positions=positions,
        slot_mapping=slots,
        query_starts=starts,
        context_lens=torch.tensor([b + n for b, n in zip(before, new, strict=True)]),
        block_tables=tables,
        sample_rows=starts[1:] - 1,
        copies=torch.zeros((0, 2), dtype=torch.long),
    )


def _reference(q, k, v, offset, layer: LayerAttention) -> torch.Tensor:
    """Plain fp32 attention: query i (position offset + i) sees keys <= its position."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.float().repeat_interleave(groups, 0), v.float().repeat_interleave(groups, 0)
    scores = q.float() @ k.transpose(-1, -2) * layer.scaling
    if layer.softcap is not None:
        scores = torch.tanh(scores / layer.softcap) * layer.softcap
    rows = torch.arange(q.shape[1])[:, None] + offset
    keys = torch.arange(k.shape[1])[None]
    allowed = keys <= rows
    if layer.sliding_window is not None:
        allowed &= keys > rows - layer.sliding_window
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


BACKENDS = {"sdpa": SdpaBackend(), "cpu": cpu_backend.BACKEND}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize(
    "layer", [LayerAttention(0.3), LayerAttention(0.3, softcap=5.0, sliding_window=6)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_and_decode_with_unequal_head_sizes_match_fp32_attention(backend, layer, dtype):
    gen = torch.Generator().manual_seed(0)
    cache = PagedKVCache(_shape(dtype, layers=1), 12, torch.device("cpu"))
    k_cache, v_cache = cache.layer(0)
    tables = torch.randperm(12, generator=gen)[:8].view(2, 4)  # shuffled, 16 tokens each
    history = [(torch.empty(KV, 0, DK), torch.empty(KV, 0, DV)) for _ in range(2)]
    uploader = StepUploader(torch.device("cpu"))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    # fresh prefills; a continued prefill beside a decode; a decode batch of both
    for before, new in (([0, 0], [7, 5]), ([7, 5], [3, 1]), ([10, 6], [1, 1]), ([11, 7], [1, 1])):
        plan = _plan(tables, before, new)
        total = sum(new)
        q = torch.randn(HEADS, total, DK, generator=gen).to(dtype)
        k = torch.randn(KV, total, DK, generator=gen).to(dtype)
        v = torch.randn(KV, total, DV, generator=gen).to(dtype)
        step = AttentionMetadata.build(plan, uploader.upload(plan, BS), cache, BACKENDS[backend])
        out = BACKENDS[backend].forward(q, k, v, k_cache, v_cache, step, layer)
        assert out.shape == (HEADS, total, DV) and out.dtype == dtype
        for s in range(2):
            a, b = plan.query_starts[s], plan.query_starts[s + 1]
            hk, hv = history[s]
            history[s] = (
                torch.cat([hk, k[:, a:b].float()], 1),
                torch.cat([hv, v[:, a:b].float()], 1),
            )
            want = _reference(q[:, a:b], *history[s], before[s], layer)
            diff = (out[:, a:b].float() - want).abs().max()
            assert diff < tol, (before, new, s, diff)


def test_v_head_dim_comes_from_the_policy_named_attribute():
    from types import SimpleNamespace

    from dstp.worker.kv_cache import v_head_dim

    config = SimpleNamespace(v_head_dim=16)
    assert v_head_dim(SimpleNamespace(), config, 24) == 24  # policies without one: K's
    assert v_head_dim(SimpleNamespace(v_head_dim_attr=None), config, 24) == 24
    assert v_head_dim(SimpleNamespace(v_head_dim_attr="v_head_dim"), config, 24) == 16
    with pytest.raises(ValueError, match="v_head_dim_attr='nope'"):
        v_head_dim(SimpleNamespace(v_head_dim_attr="nope"), config, 24)


def test_built_in_policies_give_deepseek_its_v_head_size_and_others_k_s():
    from dstp.policies import policy_for

    from dstp.worker.kv_cache import v_head_dim
    from tests.helpers.policy_models import make_config

    for name in ("deepseek_v2", "deepseek_v3"):
        config = make_config(name)
        assert v_head_dim(policy_for(config), config, config.qk_head_dim) == 16
    llama = make_config("qwen3")
    assert v_head_dim(policy_for(llama), llama, 16) == 16
