"""Paged decode attention in Triton: each decoding token reads its keys and values in
place through its block table, one kernel a layer.

The SDPA fallback gathers every decoding sequence's blocks into new K/V tensors, then
runs scores, mask, softmax, two casts and two matmuls: ~14 kernels a layer, 0.47 ms of a
1.87 ms batch-1 step on an H200 (benchmarks/FINDINGS.md, "The second GPU run"). Here one
program per (sequence, KV head) streams the sequence's keys ``BLOCK_N`` at a time with an
online softmax, all in fp32 (as dstp's CPU kernel: exact products of 16-bit inputs; fp32
``tl.dot`` also keeps the CPU interpreter exact, whose 16-bit dot is wrong), for the
``GROUP`` query heads that share the KV
head: the same visible keys, soft-cap and sliding window as :mod:`.sdpa`'s decode.

The op (``dstp::paged_decode_attention``) has the signature of dstp's CPU decode kernel
(:func:`dstp.cpu.kernels.decode_attention_bf16`): ``query [H, T, dk]``, caches
``[KV, slots, d]``, the decoding tokens' ``rows [D]``, block ``tables [D, B]`` and
context ``lens [D]``; it returns ``[T, H, dv]`` with the decoding rows written. On CUDA
it launches the kernel; on a CPU (the fake CUDA card of the tests) it computes the same with
:mod:`.sdpa`'s decode. The tests run the kernel itself on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``, set in tests/conftest.py).
As a custom op it is opaque to ``torch.compile`` and capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys a program reads per iteration
MAX_HEAD_DIM = 256
MAX_GROUP = 64  # query heads per KV head


@triton.jit
def _paged_decode(
    q_ptr,
    k_ptr,
    v_ptr,
    rows_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    stride_qh,
    stride_qt,
    stride_kh,
    stride_ks,
    stride_vh,
    stride_vs,
    stride_table,
    stride_ot,
    stride_oh,
    scaling,
    softcap,
    window,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    DK: tl.constexpr,
    DK_P: tl.constexpr,
    DV: tl.constexpr,
    DV_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    row = tl.load(rows_ptr + seq)
    ctx = tl.load(lens_ptr + seq)
    g = tl.arange(0, GROUP_P)
    dk = tl.arange(0, DK_P)
    dv = tl.arange(0, DV_P)
    heads = kv_head * GROUP + g
    q_mask = (g[:, None] < GROUP) & (dk[None, :] < DK)
    q = tl.load(q_ptr + heads[:, None] * stride_qh + row * stride_qt + dk[None, :], mask=q_mask)
    q = q.to(tl.float32)
    best = tl.full([GROUP_P], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, DV_P], tl.float32)
    first = 0
    if WINDOW:
        first = tl.maximum(ctx - window, 0)
    for start in range(first, ctx, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        visible = pos < ctx
        block = tl.load(tables_ptr + seq * stride_table + pos // BLOCK_SIZE, mask=visible)
        slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
        k = tl.load(
            k_ptr + kv_head * stride_kh + slot[:, None] * stride_ks + dk[None, :],
            mask=visible[:, None] & (dk[None, :] < DK),
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scaling
        if SOFTCAP:
            scores = (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0) * softcap  # tanh
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        rescale = tl.exp(best - new_best)
        probs = tl.exp(scores - new_best[:, None])
        total = total * rescale + tl.sum(probs, 1)
        v = tl.load(
            v_ptr + kv_head * stride_vh + slot[:, None] * stride_vs + dv[None, :],
            mask=visible[:, None] & (dv[None, :] < DV),
            other=0.0,
        )
        update = tl.dot(probs, v.to(tl.float32), input_precision="ieee")
        acc = acc * rescale[:, None] + update
        best = new_best
    out = acc / tl.where(total > 0, total, 1.0)[:, None]  # no keys (a padding row): zeros
    o_mask = (g[:, None] < GROUP) & (dv[None, :] < DV)
    o_ptrs = out_ptr + row * stride_ot + heads[:, None] * stride_oh + dv[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)


def fits(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the kernel takes this layer: float caches of the query's dtype, contiguous
    head dims up to :data:`MAX_HEAD_DIM`, at most :data:`MAX_GROUP` query heads a KV head."""
    heads, kv = query.shape[0], k_cache.shape[0]
    return (
        query.dtype == k_cache.dtype == v_cache.dtype
        and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and query.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1
        and max(k_cache.shape[-1], v_cache.shape[-1]) <= MAX_HEAD_DIM
        and heads % kv == 0
        and heads // kv <= MAX_GROUP
    )


def _pow2(n: int, least: int = 16) -> int:
    """The power of two at least ``n`` and ``least`` (tl.dot's smallest side is 16)."""
    return max(least, triton.next_power_of_2(n))


def reference(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    scaling: float,
    softcap: float,
    window: int,
) -> torch.Tensor:
    """What the kernel computes, by :mod:`.sdpa`'s decode over gathered blocks: the op on
    a CPU (the fake CUDA card's values), and the start-up check's yardstick on a GPU."""
    from dstp.worker.attention.backends.sdpa import _decode, _gather_blocks

    keys = torch.arange(tables.shape[1] * block_size, device=lens.device)
    visible = keys < lens[:, None]
    if window:
        visible &= keys >= lens[:, None] - window
    k = _gather_blocks(k_cache, tables, block_size)
    v = _gather_blocks(v_cache, tables, block_size)
    attended = _decode(query[:, rows], k, v, visible, scaling, softcap or None)
    out = query.new_zeros((query.shape[1], query.shape[0], v_cache.shape[-1]))
    out[rows] = attended.transpose(0, 1)
    return out


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return not isinstance(_paged_decode, triton.runtime.JITFunction)


def run_kernel(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    scaling: float,
    softcap: float,
    window: int,
) -> torch.Tensor:
    """``[T, H, dv]``: each decoding row's attention over its cached keys (``softcap`` 0:
    none; ``window`` 0: every key), by the kernel."""
    heads, tokens, dk = query.shape
    kv, dv = k_cache.shape[0], v_cache.shape[-1]
    group = heads // kv
    out = query.new_empty((tokens, heads, dv))  # every decoding row is written
    _paged_decode[(rows.shape[0], kv)](
        query, k_cache, v_cache, rows, tables, lens, out,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        tables.stride(0),
        out.stride(0), out.stride(1),
        scaling, softcap or 1.0, window,
        GROUP=group, GROUP_P=_pow2(group), DK=dk, DK_P=_pow2(dk), DV=dv, DV_P=_pow2(dv),
        BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N, SOFTCAP=bool(softcap), WINDOW=bool(window),
    )  # fmt: skip
    return out


# the op: the kernel on CUDA, the reference on a CPU, shapes alone for the compiler
paged_decode_attention = torch.library.custom_op(
    "dstp::paged_decode_attention", run_kernel, mutates_args=(), device_types="cuda"
)
paged_decode_attention.register_kernel("cpu")(reference)


@paged_decode_attention.register_fake
def _(query, k_cache, v_cache, rows, tables, lens, block_size, scaling, softcap, window):
    return query.new_empty((query.shape[1], query.shape[0], v_cache.shape[-1]))
