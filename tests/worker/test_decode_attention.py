"""dstp's paged decode-attention kernel (CPU, both builds) against fp32 math and HF.

Oracle for the kernel: the sdpa backend's decode on the same cache widened to fp32
(blocks gathered, two matmuls, softmax), rounded to bf16, for shuffled block tables,
every length from 1 to a full table, 1-16 query heads per KV head, softcap and sliding
windows. Each test runs each build this CPU can run: the AVX2 build's fp32 path and the
AVX512-BF16 build's (vdpbf16ps scores 16 keys at a time, 16-lane softmax and values).
Oracle for the engine: HF unsharded at fp32 on the same bf16-rounded weights.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dstp.cpu import features as cpu_features
from dstp.cpu import kernels as cpu_kernels
from dstp.worker.attention.backends import LayerAttention, backend_for
from dstp.worker.attention.backends import cpu as cpu_backend
from dstp.worker.attention.backends.sdpa import SdpaBackend

needs_kernel = pytest.mark.skipif(
    not (cpu_features.has_avx2_fma() or cpu_features.has_avx512_bf16()),
    reason="dstp's CPU kernels need AVX2+FMA or AVX512-BF16",
)


BUILDS = {"avx2": cpu_features.has_avx2_fma, "avx512_bf16": cpu_features.has_avx512_bf16}


@pytest.fixture(scope="module", params=sorted(BUILDS))
def ops(request):
    if not BUILDS[request.param]():
        pytest.skip(f"this CPU cannot run the {request.param} build")
    ops = cpu_kernels._build(request.param)
    assert hasattr(ops, "decode_attention_bf16"), "both builds carry the decode kernel"
    return ops


def _step(kv: int, dim: int, block_size: int, lens: list[int], seed: int):
    """A bf16 paged cache with shuffled block tables and the metadata of one decode step."""
    gen = torch.Generator().manual_seed(seed)
    width = (max(lens) + block_size - 1) // block_size
    num_blocks = width * len(lens) + 3
    k = torch.randn(kv, num_blocks * block_size, dim, generator=gen).bfloat16()
    v = torch.randn(kv, num_blocks * block_size, dim, generator=gen).bfloat16()
    tables = torch.randperm(num_blocks, generator=gen)[: width * len(lens)].view(len(lens), width)
    lengths = torch.tensor(lens)
    step = SimpleNamespace(
        cache=SimpleNamespace(shape=SimpleNamespace(block_size=block_size)),
        decode_blocks=tables,
        decode_lens=lengths,
        decode_rows=torch.arange(2, 2 + len(lens)),  # rows 0-1 are another sequence's
        decode_valid=torch.arange(width * block_size)[None] < lengths[:, None],
    )
    return k, v, step


def _fp32_reference(query, k, v, step, scaling, softcap=None, window=None):
    return SdpaBackend._decode_batch(
        query.float(), k.float(), v.float(), step, LayerAttention(scaling, softcap, window)
    )


CASES = [  # kv heads, query heads per kv head, head dim, block size, lengths
    (2, 4, 64, 16, [1, 16, 17, 100, 64]),
    (1, 1, 8, 1, [1, 2, 3]),
    (4, 8, 128, 16, [250, 3]),
    (2, 16, 72, 5, [1, 40, 39]),
]


def _kernel(ops, query, k, v, step, scaling, softcap=None, window=None):
    """One build's bf16 rows of the decoding sequences, as ``[H, D, dv]`` fp32."""
    out = ops.decode_attention_bf16(
        query, k, v, step.decode_rows, step.decode_blocks, step.decode_lens,
        step.cache.shape.block_size, scaling, softcap or 0.0, window or 0,
    )  # fmt: skip
    assert out.shape == (query.shape[1], query.shape[0], v.shape[-1]) and out.dtype == k.dtype
    return out[step.decode_rows].transpose(0, 1).float()


def _assert_rounded_from(got, want):
    """``got`` is ``want`` rounded to bf16: within one bf16 ulp (2**-7 relative)."""
    assert torch.allclose(got, want, rtol=2**-7, atol=1e-5), (got - want).abs().max()
    assert (got == want.bfloat16().float()).float().mean() > 0.97  # mostly the same rounding


@needs_kernel
@pytest.mark.parametrize("kv,group,dim,block_size,lens", CASES)
def test_matches_fp32_attention_on_the_paged_cache(ops, kv, group, dim, block_size, lens):
    k, v, step = _step(kv, dim, block_size, lens, seed=dim + group)
    query = torch.randn(kv * group, len(lens) + 2, dim).bfloat16()
    want = _fp32_reference(query, k, v, step, 0.3)
    _assert_rounded_from(_kernel(ops, query, k, v, step, 0.3), want)


@needs_kernel
@pytest.mark.parametrize("softcap,window", [(5.0, None), (None, 7), (30.0, 20)])
def test_softcap_and_sliding_window_as_the_sdpa_backend(ops, softcap, window):
    k, v, step = _step(2, 64, 16, [1, 9, 50, 33], seed=3)
    query = torch.randn(8, 6, 64).bfloat16() * 4
    want = _fp32_reference(query, k, v, step, 0.125, softcap, window)
    _assert_rounded_from(_kernel(ops, query, k, v, step, 0.125, softcap, window), want)


@needs_kernel
def test_a_strided_query_and_a_wrong_scaling(ops):
    """The query as the fused layer hands it over (a view of the q/k/v output, heads strided);
    and the comparison can fail: another scaling is caught."""
    k, v, step = _step(2, 32, 4, [5, 1, 12], seed=5)
    qkv = torch.randn(5, (8 + 2 * 2) * 32).bfloat16()
    query = qkv[:, : 8 * 32].view(5, 8, 32).transpose(0, 1)
    want = _fp32_reference(query, k, v, step, 0.2)
    _assert_rounded_from(_kernel(ops, query, k, v, step, 0.2), want)
    with pytest.raises(AssertionError):
        _assert_rounded_from(_kernel(ops, query, k, v, step, 0.21), want)


@needs_kernel
def test_lengths_outside_the_tables_are_refused_not_read(ops):
    k, v, step = _step(1, 8, 4, [3, 8], seed=0)
    q = torch.randn(1, 4, 8).bfloat16()
    for bad in ([0, 8], [3, 9]):
        step.decode_lens = torch.tensor(bad)
        with pytest.raises(RuntimeError, match="keys, outside"):
            _kernel(ops, q, k, v, step, 1.0)


@needs_kernel
def test_group_sizes_outside_1_to_16_are_refused(ops):
    """The kernels are picked from a table by group size: no size may index past it."""
    k, v, step = _step(2, 8, 4, [3, 8], seed=0)
    for heads in (0, 3, 34):  # no heads, not a multiple of the KV heads, 17 per KV head
        q = torch.randn(heads, 4, 8).bfloat16()
        with pytest.raises(RuntimeError, match="query heads per KV head"):
            _kernel(ops, q, k, v, step, 1.0)


def test_the_cpu_backend_takes_only_what_the_kernel_takes():
    assert backend_for(torch.device("cpu")) is cpu_backend.BACKEND
    bf16 = torch.zeros(2, 16, 64, dtype=torch.bfloat16)
    query = torch.zeros(8, 1, 64, dtype=torch.bfloat16)
    assert cpu_backend.fits(query, bf16)
    assert not cpu_backend.fits(query.float(), bf16.float())  # fp32 cache
    assert not cpu_backend.fits(query[..., :60], bf16[..., :60])  # head dim 60
    assert not cpu_backend.fits(query.repeat(8, 1, 1), bf16)  # 32 heads per KV head


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    from tests.helpers.tiny_models import llama_config, save_random_model

    config = llama_config(num_attention_heads=8, num_key_value_heads=2, vocab_size=256)
    return save_random_model(config, tmp_path_factory.mktemp("bf16") / "model")


def _engine_logprob_error(path, monkeypatch, kernel: bool) -> tuple[float, int]:
    """Worst |logprob - HF's| over greedy tokens of 4 sequences decoding together."""
    from dstp.engine.llm_engine import Engine, EngineConfig
    from tests.helpers.hf_reference import worst_greedy_logprob_error

    calls = []
    real = cpu_kernels.decode_attention_bf16

    def counted(*args):
        calls.append(1)
        return real(*args) if kernel else None

    monkeypatch.setattr(cpu_kernels, "decode_attention_bf16", counted)
    engine = Engine(EngineConfig(model=str(path), dtype="bfloat16", num_blocks=64))
    prompts = [[5, 9, 33, 7], [1] + list(range(40, 70)), [3, 3], list(range(100, 117))]
    return worst_greedy_logprob_error(engine, path, prompts), len(calls)


@needs_kernel
def test_the_engine_through_the_kernel_is_as_close_to_hf_as_pytorch_attention(
    bf16_llama, monkeypatch
):
    with_kernel, calls = _engine_logprob_error(bf16_llama, monkeypatch, kernel=True)
    without, _ = _engine_logprob_error(bf16_llama, monkeypatch, kernel=False)
    assert calls >= 2 * 11, "every layer of every batched decode step should ask for the kernel"
    assert with_kernel <= 1.5 * without + 0.02, (with_kernel, without)


def test_a_float32_model_never_builds_the_bf16_kernels(bf16_llama, monkeypatch):
    """Building them takes a minute or two on first use; a float32 model's layers have no use
    for them (the sampler's ops take float32 logits from any model: they are stubbed out
    here, so that only the layers' asks are seen)."""
    from dstp.engine.llm_engine import Engine, EngineConfig
    from dstp.engine.sampling_params import SamplingParams

    asked = []
    monkeypatch.setattr(cpu_kernels, "_ops", lambda: asked.append(1))
    monkeypatch.setattr(cpu_kernels, "sampler_ops", lambda: None)
    engine = Engine(EngineConfig(model=str(bf16_llama), dtype="float32", num_blocks=64))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    results = engine.generate([[5, 9, 33], [1, 2, 3, 4, 5]], params)
    assert all(len(result.outputs[0].token_ids) == 4 for result in results)
    assert not asked, "a float32 model asked for the bf16 kernels"


@pytest.mark.parametrize("softcap,window", [(None, None), (5.0, 7)])
def test_decode_groups_under_the_byte_cap_give_the_same_attention(monkeypatch, softcap, window):
    """Past DECODE_GROUP_BYTES the batch goes in groups of sequences: the same output as
    one group (a cap of one sequence's bytes: every sequence alone)."""
    from dstp.worker.attention.backends import sdpa

    k, v, step = _step(2, 32, 4, [1, 9, 30, 17, 4], seed=3)
    query = torch.randn(8, 7, 32)
    layer = LayerAttention(0.2, softcap, window)
    whole = SdpaBackend._decode_batch(query, k.float(), v.float(), step, layer)
    monkeypatch.setattr(sdpa, "DECODE_GROUP_BYTES", 1)
    assert sdpa.decode_group_size(5, 10**6) == 1
    alone = SdpaBackend._decode_batch(query, k.float(), v.float(), step, layer)
    assert torch.allclose(alone, whole, atol=1e-6)


def test_a_strided_sdpa_output_as_cuda_returns_it(monkeypatch):
    """CUDA's memory-efficient SDPA kernel returns its output strided ([B, L, H, d] in
    memory, seen on an H200 on 2026-12-04, where a ``.view`` of it failed the start-up
    probe); a continued prefill must read it whatever its strides, as on CPU."""
    from dstp.worker.attention.backends import sdpa

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(8, 3, 16, generator=gen)  # 8 query heads, 3 new tokens
    k, v = (torch.randn(2, 7, 16, generator=gen) for _ in range(2))  # 2 KV heads, 7 keys
    want = sdpa._continued_prefill(q, k, v, 0.25, offset=4)
    plain = torch.nn.functional.scaled_dot_product_attention

    def strided(*args, **kwargs):
        out = plain(*args, **kwargs)  # [B, H, L, d] laid out as [B, L, H, d]
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", strided)
    torch.testing.assert_close(sdpa._continued_prefill(q, k, v, 0.25, offset=4), want)
