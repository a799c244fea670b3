"""The CUDA backend's Triton paged decode kernel, run on CPU tensors in Triton's interpreter
(tests/conftest.py sets ``TRITON_INTERPRET=1``), against a per-sequence loop over the
cache: GQA groups, padded and unequal head dims, contexts across the kernel's key tiles,
soft-cap and sliding window, table rows strided as the decode buckets' are, padding rows.
"""

from __future__ import annotations

import logging

import pytest
import torch

from dstp.worker.attention.backends import backend_for, cuda, sdpa, triton_paged


def _oracle(q, k_cache, v_cache, rows, tables, lens, block_size, scaling, softcap, window):
    """``[T, H, dv]`` (decoding rows only), one sequence at a time in float64."""
    heads, tokens, _ = q.shape
    group = heads // k_cache.shape[0]
    out = torch.zeros(tokens, heads, v_cache.shape[-1], dtype=torch.float64)
    for i, row in enumerate(rows.tolist()):
        n = int(lens[i])
        pos = torch.arange(n)
        slots = tables[i, pos // block_size] * block_size + pos % block_size
        k = k_cache[:, slots].double().repeat_interleave(group, 0)  # [H, n, dk]
        v = v_cache[:, slots].double().repeat_interleave(group, 0)
        scores = torch.einsum("hd,hnd->hn", q[:, row].double(), k) * scaling
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        if window:
            scores[:, : max(0, n - window)] = float("-inf")
        out[row] = torch.einsum("hn,hnd->hd", scores.softmax(-1), v)
    return out


def _case(dtype, heads, kv, dk, dv, block_size, lens, seed=0, table_pad=3):
    """Random caches and queries; each sequence's blocks scattered over the cache, its
    table a row of a wider buffer (as a decode bucket's is)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in lens)
    num_blocks = max(64, 2 * width)
    k_cache = torch.randn(kv, num_blocks * block_size, dk, generator=gen).to(dtype)
    v_cache = torch.randn(kv, num_blocks * block_size, dv, generator=gen).to(dtype)
    tokens = len(lens) + 2  # two rows that do not decode (a prefill's, the caller's)
    q = torch.randn(heads, tokens, dk, generator=gen).to(dtype)
    rows = torch.arange(0, 2 * len(lens), 2)[: len(lens)].clamp(max=tokens - 1)
    buffer = torch.zeros(len(lens), width + table_pad, dtype=torch.long)
    for i in range(len(lens)):
        buffer[i, :width] = torch.randperm(num_blocks, generator=gen)[:width]
    tables = buffer[:, :width]  # row stride width + table_pad
    return q, k_cache, v_cache, rows, tables, torch.tensor(lens)


CASES = [
    # dtype, heads, kv, dk, dv, block size, context lengths, softcap, window
    (torch.float32, 8, 2, 16, 16, 4, [1, 37, 130], 0.0, 0),
    (torch.float32, 12, 4, 32, 32, 16, [63, 64, 65], 0.0, 0),  # group 3, the tile's edges
    (torch.float32, 4, 4, 8, 12, 4, [5, 70], 5.0, 7),  # MHA, dk != dv, soft-cap, window
    (torch.float32, 32, 8, 64, 64, 16, [200], 0.0, 100),
    (torch.bfloat16, 8, 2, 64, 64, 16, [1, 100], 0.0, 0),
    (torch.float16, 16, 1, 128, 128, 16, [33], 30.0, 0),  # MQA, a 128 head dim
    # keys split across programs (flash-decoding): 5 splits of 320 keys, a sequence that
    # ends in the first, one across all, a window that leaves the first splits empty
    (torch.float32, 8, 2, 16, 16, 16, [1, 600, 1500], 0.0, 0),
    (torch.bfloat16, 8, 2, 64, 64, 16, [700, 1500], 0.0, 300),
]


@pytest.mark.parametrize("dtype, heads, kv, dk, dv, bs, lens, softcap, window", CASES)
def test_the_kernel_equals_a_loop_over_each_sequence(
    dtype, heads, kv, dk, dv, bs, lens, softcap, window
):
    assert triton_paged.interpreting()
    q, k_cache, v_cache, rows, tables, lens_t = _case(dtype, heads, kv, dk, dv, bs, lens)
    args = (q, k_cache, v_cache, rows, tables, lens_t, bs, 0.3, softcap, window)
    got = triton_paged.run_kernel(*args)
    want = _oracle(*args)
    tol = 2e-6 if dtype == torch.float32 else 1e-2  # one rounding of the output
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got[rows].double(), want[rows], rtol=tol, atol=tol)
    # the op's CPU path (the fake CUDA card's values) computes the same, as SDPA's path
    # does: 16-bit probabilities, so 16-bit sums over hundreds of keys are a little further
    by_op = triton_paged.paged_decode_attention(*args)
    tol = 2e-6 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(by_op[rows].double(), want[rows], rtol=tol, atol=tol)


@pytest.mark.parametrize("longest", [9, 1500])  # one program a sequence, split keys
def test_a_padding_row_of_no_keys_gives_zeros_not_nans(longest):
    """A decode bucket's padding rows: context length 0 leaves the row all zeros."""
    case = _case(torch.float32, 8, 2, 16, 16, 16, [9, longest])
    q, k_cache, v_cache, rows, tables, lens = case
    lens[0] = 0
    got = triton_paged.run_kernel(q, k_cache, v_cache, rows, tables, lens, 16, 0.3, 0.0, 0)
    assert torch.isfinite(got[rows]).all() and not got[rows[0]].any() and got[rows[1]].any()


def test_key_splits_fill_the_gpu_from_shapes_alone():
    assert triton_paged.key_splits(8, 4096) == 16  # batch 1, 8 KV heads: 128 programs
    assert triton_paged.key_splits(8, 300) == 1  # short tables: one program each
    assert triton_paged.key_splits(512, 4096) == 1  # batch 64: already 512 programs
    assert triton_paged.key_splits(1, 2**20) == triton_paged.MAX_SPLITS


def test_cuda_devices_get_the_kernel_where_its_start_up_check_passes():
    from tests.helpers.fake_cuda import fake_cuda_rank

    cuda._kernel_problem.cache_clear()
    with fake_cuda_rank(total_gib=0.02):
        assert backend_for(torch.device("cuda:0")) is cuda.BACKEND
    q = torch.empty(8, 1, 64, dtype=torch.bfloat16)
    cache = torch.empty(2, 16, 64, dtype=torch.bfloat16)
    assert triton_paged.fits(q, cache, cache)
    assert not triton_paged.fits(q, cache.float(), cache.float())  # dtypes differ
    wide = torch.empty(2, 16, 512, dtype=torch.bfloat16)
    assert not triton_paged.fits(q.new_empty(8, 1, 512), wide, wide)  # past MAX_HEAD_DIM


def _broken(*args):
    raise RuntimeError("PassManager::run failed")


def _wrong(*args):
    return triton_paged.reference(*args) + 1


@pytest.mark.parametrize(
    "kernel, env, reason",
    [
        (_broken, "1", "it raised RuntimeError: PassManager::run failed"),
        (_wrong, "1", "it differs from SDPA's decode by 1"),
        (None, "0", "DSTP_TRITON_DECODE=0"),
    ],
)
def test_a_kernel_that_fails_its_check_leaves_decode_to_sdpa(
    monkeypatch, caplog, kernel, env, reason
):
    from tests.helpers.fake_cuda import fake_cuda_rank

    if kernel is not None:
        monkeypatch.setattr(triton_paged, "paged_decode_attention", kernel)
    monkeypatch.setenv("DSTP_TRITON_DECODE", env)
    cuda._kernel_problem.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="dstp"), fake_cuda_rank(total_gib=0.02):
            assert backend_for(torch.device("cuda:0")) is sdpa.BACKEND
    finally:
        cuda._kernel_problem.cache_clear()
    assert "through SDPA's gathers, not the Triton kernel: " + reason in caplog.text
