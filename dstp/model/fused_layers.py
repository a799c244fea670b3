"""Fused decoder layers a policy may name (issue 22 item 1), swapped in after loading.

HF's ``LlamaDecoderLayer`` in a batch-8 decode step is 32 ops with dstp's CPU kernels
and 51 in plain PyTorch (benchmarks/step_shape.py, 2026-12-03 before the layer kernels):
three q/k/v GEMMs, two gate/up GEMMs, a ten-op rotary, an eight-op RMSNorm twice. On a
GPU each op is a kernel launch, and at decode sizes the launches, not the arithmetic, are
the cost. :class:`FusedLlamaLayer` computes the same function in 11 ops with the kernels
(norm, q/k/v GEMM, rotary, cache write, decode attention, o GEMM, add+norm, gate/up GEMM,
SiLU-mul, down GEMM, residual add: one call each) and 27 in plain PyTorch, as vLLM's Llama
layer (~13 kernels) and DeepSpeed-Inference's injected layers do:

- q/k/v as ONE column-parallel GEMM, gate/up as ONE: each rank's already-loaded
  shards are copied into one weight at swap time, a layer at a time, and HF's layer
  with its separate weights is freed (and the freed heap trimmed) as it is swapped.
  After loading, resident memory is what HF's layers would hold (a 1B bf16 model:
  +14 MB, benchmarks/FINDINGS.md); while loading, the peak is one layer's packed
  copies above it (~80 MB there);
- the residual add fused with the RMSNorm after attention (one dstp CPU kernel call
  for bf16 on CPU, where the RMSNorm swap (:mod:`dstp.model.norms`) proved the
  kernel); elsewhere each norm is one op, ``F.rms_norm`` (one fused kernel on a GPU,
  where HF's module is eight ops); Granite's residual multiplier rides in the add
  (``alpha``); Qwen3's q/k norms are two ops for all heads;
- rotary as ``x * cos + roll(x) * (sin * sign)`` on q and k together: HF's
  ``rotate_half(x) * sin`` is ``roll(x) * sin`` with the first half's sign flipped
  (one call of dstp's kernel for bf16 on CPU, the same rounding);
- SiLU-mul on the one gate/up output (one kernel call for bf16 on CPU);
- attention through the same seam HF's attention module uses
  (``ALL_ATTENTION_FUNCTIONS`` with that module, so dstp's paged kernels (cache write
  and decode attention, one call each on CPU), SDPA, eager and flash all work as for
  HF's layer), one all-reduce per sub-layer
  (the row-parallel o/down projections').

:class:`FusedParallelLayer` is GPT-NeoX's parallel-residual form: attention and
MLP partial sums added before ONE all-reduce per layer, where HF's layer has two.

Each layer takes the call HF's model makes and returns what HF's layer returns.
A policy names its form in ``Policy.fused_layer`` (see :data:`FUSED_LAYERS`).
Each fused layer is probed against HF's own layer on seeded input before it
replaces it; a layer that does not fit the form, or differs, keeps HF's layer
and the log says why.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dstp.cpu import heap
from dstp.cpu import kernels as cpu_kernels
from dstp.distributed import TPGroup
from dstp.model.layers import ColumnParallelLinear, RowParallelLinear
from dstp.model.loading import release_free_heap
from dstp.model.norms import FusedRMSNorm
from dstp.policies.base import FUSED_LAYER_NAMES, Policy, glob_to_regex

log = logging.getLogger("dstp")

PROBE_TOKENS = 16
PROBE_POSITION = 7  # positions PROBE_POSITION.. so rotary is not the identity at 0
# probe tolerance: relative error of the layer's update (output - input), by dtype
PROBE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}
PROBE_TOLERANCE_16BIT = 2e-2  # ~2.5 bf16 ulps; a bf16 layer measures ~5e-3


class NotFusable(ValueError):
    """This HF layer does not have the form the fused layer computes; it stays HF's."""


# -- the fused ops -----------------------------------------------------------------------


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm of ``x`` with ``norm``'s weight in one op.

    dstp's CPU kernel where the RMSNorm swap proved it (``FusedRMSNorm``: HF's exact
    rounding), else ``F.rms_norm``: one ATen op (one fused kernel on CUDA) where HF's
    module is eight. In fp32 it is HF's result; in 16 bits it rounds once where HF
    rounds twice (before and after the weight), within the probe's tolerance.
    """
    if isinstance(norm, FusedRMSNorm):
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's per-head q/k norms in two ops: ``F.rms_norm`` over ``head_dim``, then each
    head's weight (``weight``: ``[heads, head_dim]``), rounded as HF's modules round."""
    return F.rms_norm(x, (x.shape[-1],), None, eps) * weight


def add_rms_norm(
    norm: nn.Module, residual: torch.Tensor, update: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(RMSNorm(residual + update * scale), residual + update * scale)``.

    One call of dstp's add+RMSNorm kernel where the RMSNorm swap proved its norm and
    the rows are contiguous bf16 on CPU (the sum rounded as ATen's add rounds it, the
    norm as HF's); else the add and :func:`rms_norm`, two ops.
    """
    if (
        isinstance(norm, FusedRMSNorm)
        and scale == 1.0
        and norm._kernel_takes(update)
        and norm._kernel_takes(residual)
    ):
        fused = cpu_kernels.add_rms_norm_bf16(update, residual, norm.weight, norm.variance_epsilon)
        if fused is not None:
            return fused
    summed = add_residual(residual, update, scale)
    return rms_norm(norm, summed), summed


def add_residual(residual: torch.Tensor, update: torch.Tensor, scale: float) -> torch.Tensor:
    """``residual + update * scale`` in one op (Granite's residual multiplier as ``alpha``)."""
    if scale == 1.0:
        return residual + update
    return torch.add(residual, update, alpha=scale)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's half-split rotary, ``x * cos + rotate_half(x) * sin``, in three ops.

    ``rotate_half(x) = cat(-x2, x1)`` is ``roll(x, d/2)`` with the first half
    negated; the sign is folded into ``signed_sin`` (``sin * rope_sign(...)``).
    """
    rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return torch.addcmul(x * cos, rolled, signed_sin)


def rotate_heads(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """:func:`rotate` of heads ``x [B, T, N, d]`` by ``cos``/``signed_sin [B, T, d]``.

    One call of dstp's rotary kernel for bf16 on CPU (the same rounding, bit for bit), else
    :func:`rotate`'s three ops.
    """
    table_shape = (x.shape[1], x.shape[3])
    fits = cos.dim() == 3 and cos.shape == signed_sin.shape and cos.shape[1:] == table_shape
    if fits and cos.shape[0] in (1, x.shape[0]) and _bf16_cpu(x, cos, signed_sin):
        fused = None if _needs_grad(x) else cpu_kernels.rotary_bf16(x, cos, signed_sin)
        if fused is not None:
            return fused
    return rotate(x, cos.unsqueeze(2), signed_sin.unsqueeze(2))


def rope_sign(head_dim: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """-1 over the first half, +1 over the second: ``sin * rope_sign`` is what
    :func:`rotate` multiplies by (exact in any dtype)."""
    half = head_dim // 2
    sign = torch.cat((torch.full((half,), -1.0), torch.ones(head_dim - half)))
    return sign.to(dtype=dtype, device=device)


def silu_mul(gate_up: torch.Tensor, width: int) -> torch.Tensor:
    """``silu(gate) * up`` of the packed gate/up GEMM output (gate first, then up).

    One call of dstp's kernel for contiguous bf16 on CPU (each op's rounding kept), else
    the two ops.
    """
    if _bf16_cpu(gate_up) and gate_up.is_contiguous() and not _needs_grad(gate_up):
        fused = cpu_kernels.silu_mul_bf16(gate_up)
        if fused is not None:
            return fused
    return F.silu(gate_up[..., :width]) * gate_up[..., width:]


def _bf16_cpu(*tensors: torch.Tensor) -> bool:
    """Whether dstp's bf16 CPU kernels take these: bf16 on CPU, each row's last dim contiguous."""
    return all(
        t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors
    )


def _needs_grad(x: torch.Tensor) -> bool:
    """The kernels have no backward."""
    return torch.is_grad_enabled() and x.requires_grad


# -- rotary from a table ------------------------------------------------------------------

# rope types whose cos/sin are a fixed function of the position ("dynamic" and "longrope"
# change with the sequence's length, so they keep HF's module)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
TABLE_CHECK_POSITIONS = 64


class RotaryTable(nn.Module):
    """HF's rotary module as a table: ``(cos, signed sin)`` of the step's positions, one lookup.

    HF's module recomputes ``cos``/``sin`` from the positions each forward (eight
    ops); this one computes them once with HF's module for every position up to the
    model's ``max_position_embeddings`` and keeps half of each row (HF's two halves are
    equal), as vLLM's cos/sin cache does. It returns the signed sin that
    :func:`rotate` takes, so only a model whose every layer is fused gets it.
    """

    def __init__(self, inner: nn.Module, rows: int, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.inner = inner  # HF's module: its attributes stay reachable
        with torch.no_grad():
            cos, sin = inner(torch.empty(0, dtype=dtype, device=device), _positions(rows, device))
        half = cos.shape[-1] // 2
        if not (
            torch.equal(cos[..., :half], cos[..., half:])
            and torch.equal(sin[..., :half], sin[..., half:])
        ):
            raise NotFusable("the rotary tables' two halves differ (not the half-split form)")
        self.rows = rows
        self.table = nn.Buffer(
            torch.cat((cos[0, :, :half], sin[0, :, :half]), dim=-1), persistent=False
        )

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos_half, sin_half = F.embedding(position_ids, self.table).chunk(2, dim=-1)
        return torch.cat((cos_half, cos_half), dim=-1), torch.cat((-sin_half, sin_half), dim=-1)

    def extra_repr(self) -> str:
        return f"positions={self.rows}"


def _positions(count: int, device: Any) -> torch.Tensor:
    return torch.arange(count, device=device)[None]


def rotary_table(inner: nn.Module, config: Any, dtype: torch.dtype, device: Any) -> RotaryTable:
    """A :class:`RotaryTable` for HF's ``inner``, checked against it; NotFusable where it may not be."""
    from dstp.engine.config import ALLOW_LONG_ENV

    rope_type = getattr(inner, "rope_type", None)
    rows = getattr(config, "max_position_embeddings", None)
    if rope_type not in STATIC_ROPE_TYPES:
        raise NotFusable(f"rope type {rope_type!r} is not a fixed table")
    if not isinstance(rows, int) or os.environ.get(ALLOW_LONG_ENV, "0") not in ("", "0"):
        raise NotFusable(f"positions may pass max_position_embeddings ({ALLOW_LONG_ENV})")
    table = RotaryTable(inner, rows, dtype, device)
    positions = torch.cat(
        (_positions(TABLE_CHECK_POSITIONS, device), _positions(rows, device)[:, -8:]), -1
    )
    probe = torch.empty(0, dtype=dtype, device=device)
    with torch.no_grad():
        (cos, sin), (ours_cos, ours_sin) = inner(probe, positions), table(probe, positions)
    sign = rope_sign(cos.shape[-1], dtype, device)
    if not (torch.equal(cos, ours_cos) and torch.equal(sin * sign, ours_sin)):
        raise NotFusable("the table differs from HF's rotary module")
    return table


# -- the layer ---------------------------------------------------------------------------


@functools.cache
def as_hf_class(fused: type[nn.Module], hf: type[nn.Module]) -> type[nn.Module]:
    """``fused``, made a subclass of HF's layer class too (its methods first).

    HF records ``output_hidden_states`` with hooks on the instances of its decoder-layer
    class (``_can_record_outputs``, matched by ``isinstance``): a fused layer that were
    not one would silently drop out of them.
    """
    if issubclass(fused, hf) or not issubclass(hf, nn.Module):
        return fused
    return type(fused.__name__, (fused, hf), {"__module__": fused.__module__})


class PackedColumnLinear(nn.Module):
    """Column-parallel linears sharing one input, as ONE GEMM over their concatenated shards.

    ``sizes`` are the local output widths of the packed projections, in order.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.sizes = sizes

    @classmethod
    def pack(cls, linears: list[nn.Module]) -> PackedColumnLinear:
        """Concatenate the shards of ``linears`` (each this rank's ``ColumnParallelLinear``).

        A copy: the sources stay allocated until the caller drops them (the fused layer's
        ``release_hf_weights`` and the swap that frees HF's layer).
        """
        for linear in linears:
            if not isinstance(linear, ColumnParallelLinear) or linear.gather_output:
                raise NotFusable(f"{type(linear).__name__} is not a column-parallel shard")
        biases = [linear.bias for linear in linears]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            raise NotFusable("some packed projections have a bias and some do not")
        with torch.no_grad():
            weight = torch.cat([linear.weight for linear in linears], dim=0)
            bias = None if biases[0] is None else torch.cat(biases, dim=0)
        return cls(weight, bias, tuple(linear.weight.shape[0] for linear in linears))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear_2d(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={'+'.join(map(str, self.sizes))}"


class FusedLlamaLayer(nn.Module):
    """HF's Llama-form decoder layer (Llama, Mistral, Qwen2, Qwen3, Granite) in fewer ops.

    Built from a loaded, sharded HF layer by :meth:`from_hf`; keeps HF's attention
    module (without its q/k/v projections once swapped in) as ``self_attn``, so the
    attention function gets the module it expects (``layer_idx``, local head
    counts, ``is_causal``, Qwen3's q/k norms).
    """

    def __init__(self, layer: nn.Module) -> None:
        nn.Module.__init__(self)  # not HF's layer's __init__ (see :func:`as_hf_class`)
        attn, mlp = _part(layer, "self_attn"), _part(layer, "mlp")
        self.self_attn = attn
        # HF's norm modules, or dstp's one-call kernel where the RMSNorm swap proved it
        self.input_layernorm = _norm(layer, "input_layernorm")
        self.post_attention_layernorm = _norm(layer, "post_attention_layernorm")
        self.qkv_proj = PackedColumnLinear.pack(
            [_part(attn, n) for n in ("q_proj", "k_proj", "v_proj")]
        )
        self.gate_up_proj = PackedColumnLinear.pack(
            [_part(mlp, "gate_proj"), _part(mlp, "up_proj")]
        )
        self.down_proj = _part(mlp, "down_proj")
        if not isinstance(self.down_proj, RowParallelLinear) or not isinstance(
            _part(attn, "o_proj"), RowParallelLinear
        ):
            raise NotFusable("o_proj and down_proj must be row-parallel")
        if not _is_silu(getattr(mlp, "act_fn", None)):
            raise NotFusable(
                f"the MLP's activation is {type(getattr(mlp, 'act_fn', None)).__name__}, not SiLU"
            )
        self.head_dim = int(attn.head_dim)
        q_size, k_size, v_size = self.qkv_proj.sizes
        if q_size % self.head_dim or k_size % self.head_dim or k_size != v_size:
            raise NotFusable(f"q/k/v widths {self.qkv_proj.sizes} are not heads of {self.head_dim}")
        self.q_heads, self.kv_heads = q_size // self.head_dim, k_size // self.head_dim
        self.inner = self.gate_up_proj.sizes[0]
        self.scaling = float(attn.scaling)
        self.residual_scale = float(getattr(layer, "residual_multiplier", 1.0))
        self.sliding_window = _sliding_window(attn)
        self.qk_norm_eps, qk_norm_weight = _qk_norm(attn, self.q_heads, self.kv_heads)
        self.qk_norm_weight = nn.Buffer(qk_norm_weight, persistent=False)
        weight = self.qkv_proj.weight
        self.signed_sin = False  # position_embeddings carry HF's sin (a RotaryTable: signed)
        self.rope_sign = nn.Buffer(
            rope_sign(self.head_dim, weight.dtype, weight.device), persistent=False
        )
        if hasattr(layer, "attention_type"):  # Qwen2/3 pick the layer's mask by it
            self.attention_type = layer.attention_type
        self.eager_attention = getattr(
            sys.modules[type(attn).__module__], "eager_attention_forward", None
        )

    @classmethod
    def from_hf(cls, layer: nn.Module) -> FusedLlamaLayer:
        return as_hf_class(cls, type(layer))(layer)

    @property
    def attention_module(self) -> nn.Module:
        """HF's attention module, which the attention function is called with."""
        return self.self_attn

    def release_hf_weights(self) -> None:
        """Drop HF's separate q/k/v projections (and q/k norms) from the kept attention module.

        Its gate/up projections go with HF's layer (and its MLP) when this layer replaces it.
        """
        for name in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm"):
            if name in self.self_attn._modules:
                delattr(self.self_attn, name)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The call ``LlamaModel`` makes of each layer; returns the new hidden states."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        normed = rms_norm(self.input_layernorm, hidden_states)
        attn = self._attention(
            normed, attention_mask, position_ids, cache, use_cache, position_embeddings, kwargs
        )
        normed, hidden_states = add_rms_norm(
            self.post_attention_layernorm, hidden_states, attn, self.residual_scale
        )
        return add_residual(hidden_states, self._mlp(normed), self.residual_scale)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``down(silu(gate) * up)``, one all-reduce. On CPU a long prefill runs it in row
        pieces whose gate/up output fits a heap block (dstp.cpu.heap): a larger one would be
        mapped and faulted in afresh on every layer (FINDINGS.md)."""
        width = self.gate_up_proj.weight.shape[0]
        rows = x.numel() // x.shape[-1]
        piece = (
            rows if x.device.type != "cpu" else heap.rows_per_block(rows, width * x.element_size())
        )
        if piece == rows:
            return self.down_proj(silu_mul(self.gate_up_proj(x), self.inner))
        flat = x.reshape(rows, x.shape[-1])
        partial = flat.new_empty(rows, self.down_proj.out_features)
        for first in range(0, rows, piece):
            up = silu_mul(self.gate_up_proj(flat[first : first + piece]), self.inner)
            partial[first : first + piece] = self.down_proj.partial(up)
        return self.down_proj.reduce(partial).view(*x.shape[:-1], -1)

    def _attention(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: Any,
        use_cache: bool | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        batch, tokens = x.shape[:-1]
        d, qh, kvh = self.head_dim, self.q_heads, self.kv_heads
        qkv = self.qkv_proj(x)
        qk = qkv[..., : (qh + kvh) * d].view(batch, tokens, qh + kvh, d)
        if self.qk_norm_weight.numel():
            qk = head_rms_norm(qk, self.qk_norm_weight, self.qk_norm_eps)
        cos, sin = position_embeddings
        signed_sin = sin if self.signed_sin else sin * self.rope_sign
        qk = rotate_heads(qk, cos, signed_sin)
        query = qk[:, :, :qh].transpose(1, 2)
        key = qk[:, :, qh:].transpose(1, 2)
        value = qkv[..., (qh + kvh) * d :].view(batch, tokens, kvh, d).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.self_attn.layer_idx, kwargs=kwargs)
        out, _ = self._attention_function()(
            self.self_attn,
            query,
            key,
            value,
            attention_mask,
            dropout=self.self_attn.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )
        return self.self_attn.o_proj(out.reshape(batch, tokens, -1))

    def _attention_function(self) -> Callable[..., tuple[torch.Tensor, Any]]:
        """What HF's attention module would call: its config's implementation, else eager."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        name = self.self_attn.config._attn_implementation
        return ALL_ATTENTION_FUNCTIONS.get_interface(name, self.eager_attention)

    def extra_repr(self) -> str:
        return (
            f"heads={self.q_heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
            f"inner={self.inner}, residual_scale={self.residual_scale}"
        )


def _part(module: nn.Module, name: str) -> nn.Module:
    part = getattr(module, name, None)
    if not isinstance(part, nn.Module):
        raise NotFusable(f"{type(module).__name__} has no {name!r} module")
    return part


def _norm(layer: nn.Module, name: str) -> nn.Module:
    """A Llama-form RMSNorm of ``layer`` (1-D weight, ``variance_epsilon``); the probe checks its math."""
    norm = _part(layer, name)
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise NotFusable(f"{name} ({type(norm).__name__}) has no 1-D weight")
    if not isinstance(getattr(norm, "variance_epsilon", None), float):
        raise NotFusable(f"{name} ({type(norm).__name__}) has no variance_epsilon")
    return norm


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _sliding_window(attn: nn.Module) -> int | None:
    """The window HF's attention passes: its own attribute (Qwen2/3), else its config's (Mistral)."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)


def _qk_norm(attn: nn.Module, q_heads: int, kv_heads: int) -> tuple[float, torch.Tensor]:
    """Qwen3's per-head q/k norms as one ``[q_heads + kv_heads, head_dim]`` weight (or empty)."""
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is None and k_norm is None:
        return 0.0, torch.empty(0)
    if q_norm is None or k_norm is None:
        raise NotFusable("only one of q_norm / k_norm")
    eps = {getattr(q_norm, "variance_epsilon", None), getattr(k_norm, "variance_epsilon", None)}
    if len(eps) != 1 or not isinstance(next(iter(eps)), float):
        raise NotFusable("q_norm and k_norm differ in eps (or have none)")
    weights = (q_norm.weight.expand(q_heads, -1), k_norm.weight.expand(kv_heads, -1))
    return next(iter(eps)), torch.cat(weights, dim=0)


class FusedParallelLayer(nn.Module):
    """GPT-NeoX's parallel-residual layer with ONE all-reduce: ``x + attn(ln1 x) + mlp(ln2 x)``.

    HF's layer all-reduces the attention's output projection and the MLP's down
    projection each; both are row-parallel partial sums of the same residual update,
    so here they are added first and reduced once (the seed's fused all-reduce, as
    DeepSpeed-Inference and Megatron do), with both biases and the residual added on
    rank 0 only, before the sum. Rotary covers the first ``rotary_ndims`` of each
    head (HF's partial rotary) and is written back into the fused q/k/v output.
    """

    def __init__(self, layer: nn.Module) -> None:
        nn.Module.__init__(self)  # not HF's layer's __init__ (see :func:`as_hf_class`)
        if getattr(layer, "use_parallel_residual", None) is not True:
            raise NotFusable("not a parallel-residual layer (use_parallel_residual)")
        attn, mlp = _part(layer, "attention"), _part(layer, "mlp")
        self.attention = attn  # HF's module, its fused query_key_value and dense kept as they are
        self.mlp = mlp
        self.input_layernorm = _layer_norm(layer, "input_layernorm")
        self.post_attention_layernorm = _layer_norm(layer, "post_attention_layernorm")
        qkv, up = _part(attn, "query_key_value"), _part(mlp, "dense_h_to_4h")
        dense, down = _part(attn, "dense"), _part(mlp, "dense_4h_to_h")
        for name, linear, kind in (
            ("query_key_value", qkv, ColumnParallelLinear),
            ("dense_h_to_4h", up, ColumnParallelLinear),
            ("dense", dense, RowParallelLinear),
            ("dense_4h_to_h", down, RowParallelLinear),
        ):
            if not isinstance(linear, kind) or getattr(linear, "gather_output", False):
                raise NotFusable(f"{name} is {type(linear).__name__}, not {kind.__name__}")
        self.tp = dense.tp
        self.head_dim, self.rotary_dim = int(attn.head_size), int(attn.rotary_ndims)
        if qkv.weight.shape[0] % (3 * self.head_dim) or self.rotary_dim % 2:
            raise NotFusable(f"query_key_value's {qkv.weight.shape[0]} rows are not q/k/v heads")
        self.heads = qkv.weight.shape[0] // (3 * self.head_dim)
        self.scaling = float(attn.scaling)
        weight = qkv.weight
        self.rope_sign = nn.Buffer(
            rope_sign(self.rotary_dim, weight.dtype, weight.device), persistent=False
        )
        self.signed_sin = False
        biases = [b for b in (dense.bias, down.bias) if b is not None]
        bias = sum(biases[1:], biases[0].clone()) if biases else None
        self.bias = None if bias is None else nn.Buffer(bias, persistent=False)  # rank 0 adds it
        self.eager_attention = getattr(
            sys.modules[type(attn).__module__], "eager_attention_forward", None
        )

    @classmethod
    def from_hf(cls, layer: nn.Module) -> FusedParallelLayer:
        return as_hf_class(cls, type(layer))(layer)

    @property
    def attention_module(self) -> nn.Module:
        return self.attention

    def release_hf_weights(self) -> None:
        """Nothing to drop: HF's own linears are used as they are (their biases live on as ``bias``)."""
        for linear in (self.attention.dense, self.mlp.dense_4h_to_h):
            linear.bias = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = False,
        layer_past: Any = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The call ``GPTNeoXModel`` makes of each layer; returns the new hidden states."""
        if layer_past is None:
            layer_past = kwargs.pop("cache", None)
        attn_in = _layer_norm_of(self.input_layernorm, hidden_states)
        mlp_in = _layer_norm_of(self.post_attention_layernorm, hidden_states)
        attn = self._attention(
            attn_in,
            attention_mask,
            position_ids,
            use_cache,
            layer_past,
            position_embeddings,
            kwargs,
        )
        first = self.tp.rank == 0  # the biases and the residual, once over the group
        bias = self.bias if first else None
        update = cpu_kernels.linear_2d(attn, self.attention.dense.weight, bias)
        update = update + cpu_kernels.linear_2d(
            self.mlp.act(self.mlp.dense_h_to_4h(mlp_in)), self.mlp.dense_4h_to_h.weight
        )
        if first:
            update = update + hidden_states
        return self.tp.all_reduce(update)

    def _attention(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        use_cache: bool | None,
        layer_past: Any,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        batch, tokens = x.shape[:-1]
        qkv = self.attention.query_key_value(x).view(batch, tokens, self.heads, 3, self.head_dim)
        cos, sin = position_embeddings
        signed_sin = sin if self.signed_sin else sin * self.rope_sign
        qk = qkv[..., :2, : self.rotary_dim]
        rotated = rotate(qk, cos[:, :, None, None], signed_sin[:, :, None, None])
        if self.rotary_dim == self.head_dim:
            query, key = rotated[..., 0, :], rotated[..., 1, :]
        else:
            qk.copy_(rotated)  # the rest of each head passes unrotated
            query, key = qkv[..., 0, :], qkv[..., 1, :]
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = qkv[..., 2, :].transpose(1, 2)
        if layer_past is not None:
            key, value = layer_past.update(key, value, self.attention.layer_idx)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.attention.config._attn_implementation, self.eager_attention
        )
        out, _ = attention(
            self.attention,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.attention.attention_dropout if self.training else 0.0,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )
        return out.reshape(batch, tokens, -1)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, tp={self.tp.size}"


def _layer_norm(layer: nn.Module, name: str) -> nn.LayerNorm:
    norm = _part(layer, name)
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise NotFusable(f"{name} is {type(norm).__name__}, not a LayerNorm over the hidden size")
    return norm


def _layer_norm_of(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


# -- choosing and proving ----------------------------------------------------------------

FUSED_LAYERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "llama": FusedLlamaLayer.from_hf,
    "gpt_neox": FusedParallelLayer.from_hf,
}
assert set(FUSED_LAYERS) == set(FUSED_LAYER_NAMES), "policies.base lists the fused layers"


@contextlib.contextmanager
def _attention_implementation(config: Any, name: str) -> Iterator[None]:
    """Run HF's and the fused layer's attention through ``name`` (the probe has no paged cache)."""
    kept = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = kept


@torch.no_grad()
def probe(hf_layer: nn.Module, fused: nn.Module, rotary: nn.Module) -> str | None:
    """Why ``fused`` does not compute what ``hf_layer`` does on a seeded input, or None.

    Compares the layers' updates (output minus input), so a wrong attention or
    MLP is not hidden under the residual. Collective on every rank (both layers
    all-reduce); the input is the same on every rank.
    """
    weight = fused.input_layernorm.weight
    generator = torch.Generator().manual_seed(0)
    width = weight.shape[0]
    x = torch.randn(1, PROBE_TOKENS, width, generator=generator).to(weight.dtype).to(weight.device)
    positions = torch.arange(PROBE_POSITION, PROBE_POSITION + PROBE_TOKENS, device=weight.device)[
        None
    ]
    position_embeddings = rotary(x, positions)
    call = dict(
        attention_mask=None, position_ids=positions, position_embeddings=position_embeddings
    )
    with _attention_implementation(fused.attention_module.config, "sdpa"):
        want = hf_layer(x, **call)
        got = fused(x, **call)
    want = want[0] if isinstance(want, tuple) else want
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"output {tuple(got.shape)} {got.dtype} != HF's {tuple(want.shape)} {want.dtype}"
    update = (want.double() - x.double()).norm()
    error = float((got.double() - want.double()).norm() / update.clamp_min(1e-30))
    tolerance = PROBE_TOLERANCE.get(weight.dtype, PROBE_TOLERANCE_16BIT)
    if not error <= tolerance:  # NaN fails too
        return f"relative error {error:.2e} of the layer's update against HF's (tolerance {tolerance:.0e})"
    return None


def decoder_layers(model: nn.Module, policy: Policy) -> list[tuple[str, nn.Module]]:
    """(name, module) of each decoder layer: the modules at the ``*`` of the policy's rules
    (``model.layers.*`` of ``model.layers.*.self_attn.q_proj``)."""
    globs = {
        ".".join(parts[: parts.index("*") + 1])
        for parts in (glob.split(".") for glob in policy.layers)
        if "*" in parts
    }
    if len(globs) != 1:
        return []
    regex = glob_to_regex(globs.pop())
    return [(name, module) for name, module in model.named_modules() if regex.fullmatch(name)]


def _rotary(model: nn.Module) -> nn.Module | None:
    rotary = getattr(_base(model), "rotary_emb", None)
    return rotary if isinstance(rotary, nn.Module) else None


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def _use_rotary_table(
    model: nn.Module, rotary: nn.Module, layers: list[nn.Module], tp: TPGroup
) -> bool:
    """Swap HF's rotary module for a :class:`RotaryTable` (every layer being fused), if it fits."""
    weight = layers[0].rope_sign
    try:
        table = rotary_table(rotary, model.config, weight.dtype, weight.device)
        reason = None
    except NotFusable as exc:
        table, reason = None, str(exc)
    if tp.min_over_ranks(0 if reason else 1) == 0:
        log.info("HF's rotary module kept: %s", reason or "another rank's table differs")
        return False
    _base(model).rotary_emb = table
    for layer in layers:
        layer.signed_sin = True
    return True


def _build_and_probe(
    build: Callable[[nn.Module], nn.Module], layer: nn.Module, rotary: nn.Module
) -> tuple[nn.Module | None, str | None]:
    """The fused layer for ``layer`` and why it may not replace it (None: it may)."""
    try:
        fused = build(layer)
    except NotFusable as exc:
        return None, f"not the fused form: {exc}"
    try:
        return fused, probe(layer, fused, rotary)
    except Exception as exc:  # a layer the fused form cannot even run keeps HF's
        return None, f"the probe raised {type(exc).__name__}: {exc}"


def fuse_decoder_layers(model: nn.Module, policy: Policy, tp: TPGroup) -> int:
    """Swap each decoder layer for the policy's fused form where it proves equal; returns how many.

    Every rank builds and probes every layer (the probes all-reduce) and a layer
    is swapped only where every rank's probe passed, so the ranks stay alike.
    Each HF layer is freed as it is swapped, so a rank holds at most one layer's
    weights twice (its packed copies and HF's separate ones) at any time.
    """
    if policy.fused_layer is None:
        return 0
    build = FUSED_LAYERS[policy.fused_layer]
    rotary = _rotary(model)
    if rotary is None:
        log.info(
            "fused %s layers not used: %s has no rotary_emb",
            policy.fused_layer,
            type(model).__name__,
        )
        return 0
    swapped, reasons = [], {}
    # names, not modules: a list of HF's layers would keep each replaced one (and its
    # separate q/k/v and gate/up weights) resident until the last layer is swapped
    layer_names = [name for name, _ in decoder_layers(model, policy)]
    for name in layer_names:
        fused, reason = _build_and_probe(build, model.get_submodule(name), rotary)
        if tp.min_over_ranks(0 if reason else 1) == 0:
            reasons.setdefault(reason or "another rank's probe failed", []).append(name)
            continue
        fused.release_hf_weights()
        _set_module(model, name, fused)  # HF's layer is freed here: nothing else holds it
        release_free_heap()  # its q/k/v may be heap chunks (glibc's mmap threshold rises)
        swapped.append(fused)
    for reason, names in reasons.items():
        log.warning(
            "%d decoder layer(s) keep HF's forward, not the fused %r layer of policy %r (%s): %s...",
            len(names), policy.fused_layer, policy.name, reason, names[0],
        )  # fmt: skip
    table = bool(swapped) and len(swapped) == len(layer_names)
    table = table and _use_rotary_table(model, rotary, swapped, tp)
    log.debug(
        "%d decoder layers run dstp's fused %r form (rotary from a table: %s)",
        len(swapped), policy.fused_layer, table,
    )  # fmt: skip
    return len(swapped)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
