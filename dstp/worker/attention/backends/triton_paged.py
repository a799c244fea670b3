"""Paged decode attention in Triton: each decoding token reads its keys and values in
place through its block table, one kernel a layer.

The SDPA fallback gathers every decoding sequence's blocks into new K/V tensors, then
runs scores, mask, softmax, two casts and two matmuls: ~14 kernels a layer, 0.47 ms of a
1.87 ms batch-1 step on an H200 (benchmarks/FINDINGS.md, "The second GPU run"). Here one
program per (sequence, KV head) streams the sequence's keys ``BLOCK_N`` at a time with an
online softmax, all in fp32 (as dstp's CPU kernel: exact products of 16-bit inputs; fp32
``tl.dot`` also keeps the CPU interpreter exact, whose 16-bit dot is wrong), for the
``GROUP`` query heads that share the KV
head: the same visible keys, soft-cap and sliding window as :mod:`.sdpa`'s decode. Where
sequences x KV heads are too few programs to fill a GPU (batch 1), each one's keys are
split across programs and a second kernel combines their softmax parts (flash-decoding).

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

from dstp.worker.attention.backends.sdpa import _decode, _gather_blocks, in_window

BLOCK_N = 64  # keys a program reads per iteration
# flash-decoding: at batch 1 an 8-KV-head model would run 8 programs on a 132-SM GPU, each
# streaming its whole context; the keys are split across programs instead (key_splits)
TARGET_PROGRAMS = 256
MIN_SPLIT_KEYS = 256
MAX_SPLITS = 32
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
    part_ptr,
    stats_ptr,
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
    split_keys,
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
    SPLIT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
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
    first = split * split_keys  # this program's keys: [first, last)
    last = tl.minimum(ctx, first + split_keys)
    if WINDOW:
        first = tl.maximum(first, ctx - window)
    for start in range(first, last, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        visible = pos < last
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
    o_mask = (g[:, None] < GROUP) & (dv[None, :] < DV)
    if SPLIT:  # this split's running max, sum and unnormalised values, for _combine_splits
        num_heads = tl.num_programs(1) * GROUP
        at = (split * tl.num_programs(0) + seq) * num_heads + heads
        tl.store(part_ptr + at[:, None] * DV + dv[None, :], acc, mask=o_mask)
        tl.store(stats_ptr + 2 * at, best, mask=g < GROUP)
        tl.store(stats_ptr + 2 * at + 1, total, mask=g < GROUP)
    else:
        out = acc / tl.where(total > 0, total, 1.0)[:, None]  # no keys (padding): zeros
        o_ptrs = out_ptr + row * stride_ot + heads[:, None] * stride_oh + dv[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _combine_splits(
    part_ptr,
    stats_ptr,
    rows_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    SPLITS: tl.constexpr,
    SPLITS_P: tl.constexpr,
    DV: tl.constexpr,
    DV_P: tl.constexpr,
):
    """One (sequence, query head): the splits' softmax parts rescaled to their common max."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_seqs = tl.num_programs(0)
    num_heads = tl.num_programs(1)
    sp = tl.arange(0, SPLITS_P)
    dv = tl.arange(0, DV_P)
    at = (sp * num_seqs + seq) * num_heads + head
    best = tl.load(stats_ptr + 2 * at, mask=sp < SPLITS, other=float("-inf"))
    total = tl.load(stats_ptr + 2 * at + 1, mask=sp < SPLITS, other=0.0)
    top = tl.max(best, 0)
    weight = tl.where(best > float("-inf"), tl.exp(best - top), 0.0)  # empty splits: 0
    parts = tl.load(
        part_ptr + at[:, None] * DV + dv[None, :],
        mask=(sp[:, None] < SPLITS) & (dv[None, :] < DV),
        other=0.0,
    )
    summed = tl.sum(weight * total, 0)
    out = tl.sum(weight[:, None] * parts, 0) / tl.where(summed > 0, summed, 1.0)
    row = tl.load(rows_ptr + seq)
    o_ptrs = out_ptr + row * stride_ot + head * stride_oh + dv
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=dv < DV)


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
    keys = torch.arange(tables.shape[1] * block_size, device=lens.device)
    visible = in_window(keys < lens[:, None], lens, window or None)
    k = _gather_blocks(k_cache, tables, block_size)
    v = _gather_blocks(v_cache, tables, block_size)
    attended = _decode(query[:, rows], k, v, visible, scaling, softcap or None)
    out = query.new_zeros((query.shape[1], query.shape[0], v_cache.shape[-1]))
    out[rows] = attended.transpose(0, 1)
    return out


def error_vs_reference(*args: object) -> float:
    """The largest difference, over the decoding rows, between the op and the reference
    computed in fp32 (as the kernel sums), for the op's arguments: how the kernel is judged
    on a device (the start-up check, gpu_check). Reads one number back to the host."""
    rows = args[3]
    got = paged_decode_attention(*args)[rows].float()
    widened = [a.float() if a.is_floating_point() else a for a in args[:6]]
    want = reference(*widened, *args[6:])[rows]
    return (got - want).abs().max().item()


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
    group, seqs = heads // kv, rows.shape[0]
    out = query.new_empty((tokens, heads, dv))  # every decoding row is written
    splits = key_splits(seqs * kv, tables.shape[1] * block_size)
    split_keys = -(-tables.shape[1] * block_size // splits)
    split_keys = -(-split_keys // BLOCK_N) * BLOCK_N  # whole key tiles per split
    part = query.new_empty((splits, seqs, heads, dv), dtype=torch.float32) if splits > 1 else out
    stats = query.new_empty((splits, seqs, heads, 2), dtype=torch.float32) if splits > 1 else out
    _paged_decode[(seqs, kv, splits)](
        query, k_cache, v_cache, rows, tables, lens, out, part, stats,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        tables.stride(0),
        out.stride(0), out.stride(1),
        scaling, softcap or 1.0, window, split_keys,
        GROUP=group, GROUP_P=_pow2(group), DK=dk, DK_P=_pow2(dk), DV=dv, DV_P=_pow2(dv),
        BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N, SOFTCAP=bool(softcap), WINDOW=bool(window),
        SPLIT=splits > 1,
    )  # fmt: skip
    if splits > 1:
        _combine_splits[(seqs, heads)](
            part, stats, rows, out, out.stride(0), out.stride(1),
            SPLITS=splits, SPLITS_P=_pow2(splits, least=2), DV=dv, DV_P=_pow2(dv),
        )  # fmt: skip
    return out


def key_splits(programs: int, table_keys: int) -> int:
    """How many programs share each (sequence, KV head)'s keys (flash-decoding): enough
    programs to fill a GPU (:data:`TARGET_PROGRAMS`), none with fewer than
    :data:`MIN_SPLIT_KEYS` keys of the table. From shapes alone, so a decode bucket's
    graph keeps its launch."""
    wanted = -(-TARGET_PROGRAMS // programs)
    return max(1, min(wanted, table_keys // MIN_SPLIT_KEYS, MAX_SPLITS))


# the op: the kernel on CUDA, the reference on a CPU, shapes alone for the compiler
paged_decode_attention = torch.library.custom_op(
    "dstp::paged_decode_attention", run_kernel, mutates_args=(), device_types="cuda"
)
paged_decode_attention.register_kernel("cpu")(reference)


@paged_decode_attention.register_fake
def _(query, k_cache, v_cache, rows, tables, lens, block_size, scaling, softcap, window):
    return query.new_empty((query.shape[1], query.shape[0], v_cache.shape[-1]))
