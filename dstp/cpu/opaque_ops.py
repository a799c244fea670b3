"""dstp's CPU kernels as torch custom ops: what ``torch.compile`` sees of them.

The kernels are pybind functions of an extension built at run time
(:mod:`dstp.cpu.kernels`), chosen by Python code that reads ``/proc/cpuinfo`` and a
``functools.cache``: Dynamo can trace neither, so under ``--compile-decode`` a bf16 CPU
model would break its graph at every linear, RMSNorm and decode attention. Under
compilation :mod:`dstp.cpu.kernels` calls these ops instead: each is opaque to the
compiler (its fake implementation gives the output's shape and dtype, from the inputs'
shapes alone) and runs, at run time, exactly the eager dispatch, so a compiled step
computes what an eager one does, bit for bit.

:func:`prepare` (eager, before anything is compiled) builds the extension and records
which kernels it carries; the tracer reads that record as a constant.
"""

from types import SimpleNamespace

import torch

from dstp.cpu import kernels

_KERNEL_NAMES = ("rms_norm_bf16", "decode_scores_bf16", "decode_values_bf16")
AVAILABLE: frozenset = frozenset()  # the kernels the build carries (prepare())


def prepare() -> None:
    """Build (or load) dstp's kernels now and record what they offer (eager only)."""
    global AVAILABLE
    ops = kernels._ops()
    AVAILABLE = frozenset(n for n in _KERNEL_NAMES if ops is not None and hasattr(ops, n))


@torch.library.custom_op("dstp::linear_bf16_cpu", mutates_args=())
def linear_bf16_cpu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """:func:`dstp.cpu.kernels.linear_2d`'s eager dispatch for a 2-D bf16 CPU input."""
    return kernels.linear_2d(x, weight, bias)


@linear_bf16_cpu.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("dstp::rms_norm_bf16", mutates_args=())
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return kernels._ops().rms_norm_bf16(x, weight, eps)


@_rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """:func:`dstp.cpu.kernels.rms_norm_bf16` under compilation: the op, or None."""
    return _rms_norm(x, weight, eps) if "rms_norm_bf16" in AVAILABLE else None


@torch.library.custom_op("dstp::decode_scores_bf16", mutates_args=())
def _decode_scores(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    blocks: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    max_len: int,
    scaling: float,
) -> torch.Tensor:
    return kernels._ops().decode_scores_bf16(q, k_cache, blocks, lens, block_size, max_len, scaling)


@_decode_scores.register_fake
def _(q, k_cache, blocks, lens, block_size, max_len, scaling):
    kv = k_cache.shape[0]
    return q.new_empty((kv, q.shape[1], q.shape[0] // kv, max_len))


@torch.library.custom_op("dstp::decode_values_bf16", mutates_args=())
def _decode_values(
    probs: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    return kernels._ops().decode_values_bf16(probs, v_cache, blocks, lens, block_size)


@_decode_values.register_fake
def _(probs, v_cache, blocks, lens, block_size):
    kv, seqs, group = probs.shape[0], probs.shape[1], probs.shape[2]
    return probs.new_empty((kv * group, seqs, v_cache.shape[2]))


_DECODE_OPS = SimpleNamespace(decode_scores_bf16=_decode_scores, decode_values_bf16=_decode_values)


def decode_attention_ops() -> SimpleNamespace | None:
    """:func:`dstp.cpu.kernels.decode_attention_ops` under compilation: the two ops, or None."""
    return _DECODE_OPS if "decode_scores_bf16" in AVAILABLE else None
