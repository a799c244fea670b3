"""dstp's CPU kernels as torch custom ops: what ``torch.compile`` sees of them.

The kernels are pybind functions of an extension built at run time
(:mod:`dstp.cpu.kernels`), chosen by Python code that reads ``/proc/cpuinfo`` and a
``functools.cache``: Dynamo can trace neither, so under ``--compile-decode`` a bf16 CPU
model would break its graph at every linear, RMSNorm, add+RMSNorm, rotary, SiLU-mul, cache write and
decode attention. Under compilation :mod:`dstp.cpu.kernels` calls these ops instead: each is opaque to the
compiler (its fake implementation gives the output's shape and dtype, from the inputs'
shapes alone) and runs, at run time, exactly the eager dispatch, so a compiled step
computes what an eager one does, bit for bit.

:func:`prepare` (eager, before anything is compiled) builds the extension and records
which kernels it carries; the tracer reads that record as a constant.
"""

import torch

from dstp.cpu import kernels

_KERNEL_NAMES = (
    "rms_norm_bf16",
    "add_rms_norm_bf16",
    "rotary_bf16",
    "silu_mul_bf16",
    "write_kv_cache_bf16",
    "decode_attention_bf16",
)
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


@torch.library.custom_op("dstp::add_rms_norm_bf16", mutates_args=())
def _add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels._ops().add_rms_norm_bf16(x, residual, weight, eps, 1.0)


@_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def add_rms_norm_bf16(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`dstp.cpu.kernels.add_rms_norm_bf16` under compilation: the op, or None."""
    return _add_rms_norm(x, residual, weight, eps) if "add_rms_norm_bf16" in AVAILABLE else None


@torch.library.custom_op("dstp::rotary_bf16", mutates_args=())
def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return kernels._ops().rotary_bf16(x, cos, sin)


@_rotary.register_fake
def _(x, cos, sin):
    return x.new_empty(x.shape)


def rotary_bf16(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """:func:`dstp.cpu.kernels.rotary_bf16` under compilation: the op, or None."""
    return _rotary(x, cos, sin) if "rotary_bf16" in AVAILABLE else None


@torch.library.custom_op("dstp::silu_mul_bf16", mutates_args=())
def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return kernels._ops().silu_mul_bf16(gate_up)


@_silu_mul.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


def silu_mul_bf16(gate_up: torch.Tensor) -> torch.Tensor | None:
    """:func:`dstp.cpu.kernels.silu_mul_bf16` under compilation: the op, or None."""
    return _silu_mul(gate_up) if "silu_mul_bf16" in AVAILABLE else None


@torch.library.custom_op("dstp::write_kv_cache_bf16", mutates_args=("k_cache", "v_cache"))
def _write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    kernels._ops().write_kv_cache_bf16(key, value, k_cache, v_cache, slots)


@_write_kv_cache.register_fake
def _(key, value, k_cache, v_cache, slots):
    return None


def write_kv_cache_bf16(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> bool:
    """:func:`dstp.cpu.kernels.write_kv_cache_bf16` under compilation: the op (True), or False."""
    if "write_kv_cache_bf16" not in AVAILABLE:
        return False
    _write_kv_cache(key, value, k_cache, v_cache, slots)
    return True


@torch.library.custom_op("dstp::decode_attention_bf16", mutates_args=())
def _decode_attention(
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
    return kernels._ops().decode_attention_bf16(
        query, k_cache, v_cache, rows, tables, lens, block_size, scaling, softcap, window
    )


@_decode_attention.register_fake
def _(query, k_cache, v_cache, rows, tables, lens, block_size, scaling, softcap, window):
    return query.new_empty((query.shape[1], query.shape[0], v_cache.shape[2]))


def decode_attention_bf16(*args: object) -> torch.Tensor | None:
    """:func:`dstp.cpu.kernels.decode_attention_bf16` under compilation: the op, or None."""
    return _decode_attention(*args) if "decode_attention_bf16" in AVAILABLE else None
