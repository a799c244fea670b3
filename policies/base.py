"""The injection-policy type: which modules of an architecture split how.

A policy is data. It names modules by glob (``*`` matches one path component,
as in transformers' ``base_model_tp_plan``) and says for each how its weight
splits across the tensor-parallel ranks:

``Col(parts)``
    column-parallel: the *output* dimension splits; no communication.
``Row(parts)``
    row-parallel: the *input* dimension splits; one all-reduce of the output.

``parts`` describe what the split dimension is made of, in order, so fused
projections split correctly (each rank takes its slice of every component):

``"q"``          the query heads (``num_heads * head_dim``)
``"kv"``         the key or value heads; replicated when TP > KV heads
``"q:3"``        query heads whose rows hold 3 head-sized blocks each
                 (per-head interleaved fused QKV, as in GPT-NeoX)
``"even"``       whatever the dimension holds, split evenly (MLP width)

``Experts(...)``
    a module of fused MoE experts (3D parameters ``(experts, out, in)``, as in
    transformers 5): every rank keeps every expert, each cut like a Megatron
    MLP (``gate_up`` column, ``down`` row), and the module's output is
    all-reduced. The router stays replicated.

``ShardedNorm(parts)``
    an RMSNorm over a column-split activation's full width (OLMo2's q/k
    norms): its weight cut like that activation, the sum of squares
    completed by one all-reduce of one number per token.

``logits``
    what the HF ``*ForCausalLM.forward`` does to the LM head's output, as
    :class:`LogitOp` steps naming the config attribute that holds the number
    (Gemma 2's final soft-capping, Granite's ``logits_scaling``, Cohere's
    ``logit_scale``). dstp calls the LM head itself, so a step missing here is
    a wrong temperature and wrong logprobs, though greedy tokens still match.

``fused_layer``
    the name of a fused decoder layer (:data:`FUSED_LAYER_NAMES`, e.g. ``"llama"``)
    that replaces HF's layers after loading: fewer ops, one GEMM for q/k/v and one
    for gate/up. Each layer is probed against HF's first and keeps HF's forward
    where it differs (dstp.model.fused_layers); ``--no-fused-layers`` turns it off.

``Policy.validate(config, tp_size)`` checks divisibility (and that every
``LogitOp`` names a config attribute) before any weight is read, and returns
the :class:`HeadLayout` the injector uses.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import torch
from torch import nn

PART_KINDS = ("q", "kv", "even")
# decoder-layer forms dstp has a fused layer for (dstp.model.fused_layers.FUSED_LAYERS):
# "llama": pre-norm RMSNorm, q/k/v (optional per-head q/k norms), half-split rotary, SwiGLU;
# "gpt_neox": parallel residual (attention and MLP beside each other, one all-reduce),
# LayerNorms, per-head interleaved fused QKV, partial rotary
FUSED_LAYER_NAMES = ("llama", "gpt_neox")
LOGIT_OP_KINDS = ("multiply", "divide", "softcap")
# a head count or head size in a policy: a config attribute's name, a literal, or a
# callable of the config (for counts no attribute holds, such as Falcon-7B's one KV head)
HeadCount = str | int | Callable[[Any], int]


class TPConfigError(ValueError):
    """The model cannot be split at the requested TP size (or the policy is wrong)."""


@dataclass(frozen=True)
class Col:
    """Column-parallel linear: output features split across ranks."""

    parts: tuple[str, ...] = ("even",)
    transposed: bool = False  # weight stored (in, out), e.g. GPT-2's Conv1D
    gather_output: bool = False

    def __post_init__(self) -> None:
        _check_parts(self.parts)


@dataclass(frozen=True)
class Row:
    """Row-parallel linear: input features split, partial sums all-reduced."""

    parts: tuple[str, ...] = ("even",)
    transposed: bool = False

    def __post_init__(self) -> None:
        _check_parts(self.parts)


@dataclass(frozen=True)
class Experts:
    """Fused MoE experts module: 3D ``gate_up`` (column) and ``down`` (row) parameters.

    ``unfused`` says how a checkpoint that stores one tensor per expert maps
    onto a fused parameter: parameter name -> per-expert tensor names relative
    to the experts module, ``{e}`` standing for the expert index, in the order
    of ``gate_up_parts`` (Mixtral: ``w1`` then ``w3``). Left empty, it is the
    naming transformers itself unfuses to (:data:`PER_EXPERT_NAMES`: Qwen2-MoE,
    Qwen3-MoE, OLMoE, DeepSeek, ...). Either way a checkpoint that stores the
    fused tensor is read as is; the per-expert names are only the fallback.
    """

    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    gate_up_parts: tuple[str, ...] = ("even", "even")
    unfused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_parts(self.gate_up_parts)
        unknown = set(self.unfused) - {self.gate_up, self.down}
        if unknown:
            raise TPConfigError(
                f"Experts.unfused names {sorted(unknown)}, not {self.gate_up!r} or {self.down!r}"
            )

    def per_expert(self) -> Mapping[str, tuple[str, ...]]:
        """Fused parameter -> its per-expert checkpoint tensors (``unfused`` or the default)."""
        if self.unfused:
            return self.unfused
        if len(self.gate_up_parts) != len(PER_EXPERT_NAMES[0]):
            return {}
        gate_up, down = PER_EXPERT_NAMES
        return {self.gate_up: gate_up, self.down: down}


# per-expert tensors of a fused (gate|up, down) pair as save_pretrained and
# the hub's originals store them, relative to the experts module
PER_EXPERT_NAMES = (("{e}.gate_proj.weight", "{e}.up_proj.weight"), ("{e}.down_proj.weight",))


@dataclass(frozen=True)
class ShardedNorm:
    """RMSNorm over a column-split activation: the whole width, not per head.

    OLMo2's ``q_norm``/``k_norm`` normalise the full ``q_proj``/``k_proj``
    output (``heads * head_dim``), which a rank holds only its slice of. Each
    rank keeps its slice of the weight (cut by ``parts``, as the column layer
    before it), sums its squares, and one all-reduce of those sums (one number
    per token) completes the mean, so the result is exact. ``cast_before_weight``
    picks the rounding of low-precision inputs: False multiplies the weight in
    fp32 and then casts (OLMo2, T5), True casts and then multiplies (Llama).
    """

    parts: tuple[str, ...] = ("q",)
    cast_before_weight: bool = False

    def __post_init__(self) -> None:
        _check_parts(self.parts)


Style = Col | Row | Experts | ShardedNorm


@dataclass(frozen=True)
class Part:
    """One parsed entry of a style's ``parts``: its kind and head_dims per unit.

    Parsed here only, so the policy check and the partitioner in dstp.model.layers
    agree on the grammar (``"q"``, ``"kv"``, ``"q:3"``, ``"even"``).
    """

    kind: str  # one of PART_KINDS
    blocks: int = 1  # head-sized blocks per head ("q:3" -> 3); unused for "even"

    def unit_size(self, head_dim: int) -> int:
        """Features per unit: ``blocks`` head_dims for a head part, 1 for ``even``."""
        return 1 if self.kind == "even" else head_dim * self.blocks


def parse_part(text: str) -> Part:
    """``"q:3"`` -> ``Part("q", 3)``; a TPConfigError (a ValueError) names the grammar."""
    kind, _, mult = text.partition(":")
    if kind not in PART_KINDS or (mult and not mult.isdigit()):
        raise TPConfigError(
            f"unknown part {text!r}: use one of {PART_KINDS}, optionally with ':N' "
            "for per-head blocks of N head_dims (e.g. 'q:3' for interleaved QKV)"
        )
    return Part(kind, int(mult) if mult else 1)


def _check_parts(parts: tuple[str, ...]) -> None:
    if isinstance(parts, str) or not parts:
        raise TPConfigError(f"parts must be a non-empty tuple of strings, got {parts!r}")
    for part in parts:
        parse_part(part)


@dataclass(frozen=True)
class HeadLayout:
    """Head counts of the full model and of one rank, for a TP size."""

    tp_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.tp_size

    @property
    def local_kv_heads(self) -> int:
        """KV heads held per rank: a replicated KV head counts once."""
        return max(1, self.num_kv_heads // self.tp_size)

    @property
    def kv_replicas(self) -> int:
        """How many ranks hold each KV head (1 unless TP > KV heads)."""
        return max(1, self.tp_size // self.num_kv_heads)

    @property
    def kv_groups(self) -> int:
        """Query heads per local KV head (HF's ``num_key_value_groups``)."""
        return self.local_heads // self.local_kv_heads

    def quantity(self, name: str) -> int:
        """A local quantity named in ``Policy.attention_attrs``."""
        values = {
            "local_heads": self.local_heads,
            "local_kv_heads": self.local_kv_heads,
            "kv_groups": self.kv_groups,
            "local_hidden": self.local_heads * self.head_dim,
            "local_kv_hidden": self.local_kv_heads * self.head_dim,
        }
        if name not in values:
            raise TPConfigError(f"unknown attention quantity {name!r}; one of {sorted(values)}")
        return values[name]


@dataclass(frozen=True)
class LogitOp:
    """One step applied to the full logits: ``kind`` by the config's ``attr``.

    ``multiply``: logits * v; ``divide``: logits / v; ``softcap``:
    tanh(logits / v) * v. An attribute set to None (or 0 for soft-capping)
    is a no-op, as in HF.
    """

    kind: str
    attr: str

    def __post_init__(self) -> None:
        if self.kind not in LOGIT_OP_KINDS:
            raise TPConfigError(f"LogitOp kind {self.kind!r} is not one of {LOGIT_OP_KINDS}")

    def apply(self, logits: Any, value: float) -> Any:
        if self.kind == "multiply":
            return logits * value
        if self.kind == "divide":
            return logits / value
        return torch.tanh(logits / value) * value


@dataclass(frozen=True)
class Policy:
    """How to shard one architecture family. See the module docstring."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    layers: Mapping[str, Style]
    embedding: str | None = None
    lm_head: str | None = None
    attention: str | None = None  # glob of the attention modules
    # module attribute -> local quantity (see HeadLayout.quantity)
    attention_attrs: Mapping[str, str] = field(default_factory=dict)
    # config attribute the attention modules read in forward -> local quantity;
    # each attention module gets a view of the config with these overridden
    # (Phi-3 slices its fused qkv with config.num_attention_heads)
    attention_config: Mapping[str, str] = field(default_factory=dict)
    # attribute of the HF embedding module holding a constant it multiplies
    # its output by (Gemma's sqrt(hidden) scale), kept by the parallel embedding
    embedding_scale: str | None = None
    # globs of ``layers`` that may match no module: layers only some configs
    # build (Qwen-MoE's dense ``mlp_only_layers`` beside its MoE blocks)
    optional_layers: tuple[str, ...] = ()
    # (regex, replacement) from model parameter names to checkpoint names,
    # tried when a name is not in the checkpoint as is (Mixtral's
    # ``mlp`` is ``block_sparse_moe`` in its checkpoints)
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    # attention implementation the model requires, overriding the caller's
    # (Gemma 2's logit soft-capping has no sdpa path in transformers)
    attn_implementation: str | None = None
    # head counts and head size: a config attribute's name, a literal int, or a callable
    # of the config returning an int, for models whose count is in no attribute
    # (Falcon-7B's one shared KV head: ``kv_heads_attr=lambda c: 1 if c.multi_query
    # else c.num_kv_heads``); ``kv_heads_attr=None``: MHA (as many as query heads);
    # ``head_dim_attr=None`` or a missing/None attribute: hidden_size / heads
    heads_attr: HeadCount = "num_attention_heads"
    kv_heads_attr: HeadCount | None = "num_key_value_heads"
    head_dim_attr: HeadCount | None = "head_dim"
    # config attribute of V's head size where it differs from K's (DeepSeek's MLA:
    # ``v_head_dim``, K's being ``qk_head_dim``); None: V's heads are K's size. The
    # paged KV cache sizes V by it (``dstp.worker.kv_cache.v_head_dim``)
    v_head_dim_attr: str | None = None
    # config attributes (besides heads) whose value must divide by the TP size
    divisible: tuple[str, ...] = ("intermediate_size",)
    # what *ForCausalLM.forward does to the LM head's output, in order
    logits: tuple[LogitOp, ...] = ()
    # the fused decoder layer this family's layers are swapped for after loading (one of
    # FUSED_LAYER_NAMES), each only where it proves equal to HF's layer; None: HF's layers
    fused_layer: str | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.fused_layer is not None and self.fused_layer not in FUSED_LAYER_NAMES:
            raise TPConfigError(
                f"policy {self.name!r}: fused_layer={self.fused_layer!r} is not one of "
                f"{FUSED_LAYER_NAMES} (or None for HF's own layers)"
            )

    # -- validation ------------------------------------------------------------
    def head_layout(self, config: Any, tp_size: int) -> HeadLayout:
        heads = _head_count(config, self.heads_attr, "heads_attr", required=True)
        kv = _head_count(config, self.kv_heads_attr, "kv_heads_attr", required=True)
        kv = kv or heads
        head_dim = _head_count(config, self.head_dim_attr, "head_dim_attr", required=False)
        head_dim = head_dim or _config_int(config, "hidden_size") // heads
        return HeadLayout(tp_size, heads, kv, head_dim)

    def problems(self, config: Any, tp_size: int) -> list[str]:
        """Why ``tp_size`` cannot shard this model (empty when it can)."""
        if tp_size < 1:
            return [f"TP size must be >= 1, got {tp_size}"]
        layout = self.head_layout(config, tp_size)
        found = []
        if layout.num_heads % tp_size:
            found.append(
                f"{_count_name(self.heads_attr, 'query heads')}={layout.num_heads} "
                f"is not divisible by TP={tp_size}"
            )
        kv = layout.num_kv_heads
        if kv != layout.num_heads and kv % tp_size and tp_size % kv:
            found.append(
                f"{_count_name(self.kv_heads_attr, 'KV heads')}={kv} and TP={tp_size}: "
                "one must divide the other "
                "(KV heads are split, or each replicated on TP/KV ranks)"
            )
        for attr in self.divisible:
            value = getattr(config, attr, None)
            if isinstance(value, int) and value % tp_size:
                found.append(f"{attr}={value} is not divisible by TP={tp_size}")
        return found

    def logit_ops(self, config: Any) -> list[tuple[LogitOp, float]]:
        """This config's logit steps with their numbers; those set to None are dropped."""
        missing = [op.attr for op in self.logits if not hasattr(config, op.attr)]
        if missing:
            raise TPConfigError(
                f"policy {self.name}: its logits steps read config attributes {missing}, "
                f"which {type(config).__name__} does not have; fix the policy's 'logits'"
            )
        values = [(op, getattr(config, op.attr)) for op in self.logits]
        odd = [f"{op.attr}={v!r}" for op, v in values if not isinstance(v, int | float | None)]
        if odd:
            raise TPConfigError(f"policy {self.name}: logits steps need numbers, got {odd}")
        return [
            (op, float(v))
            for op, v in values
            if v is not None and not (op.kind == "softcap" and v == 0)
        ]

    def valid_tp_sizes(self, config: Any, limit: int = 64) -> list[int]:
        return [n for n in range(1, limit + 1) if not self.problems(config, n)]

    def validate(self, config: Any, tp_size: int) -> HeadLayout:
        """Check ``tp_size`` against ``config``; raise a TPConfigError that lists the fix."""
        self.logit_ops(config)
        problems = self.problems(config, tp_size)
        if problems:
            valid = self.valid_tp_sizes(config)
            raise TPConfigError(
                f"cannot split {self.name} model at TP={tp_size}: "
                + "; ".join(problems)
                + f". Valid TP sizes for this model: {valid}. "
                "Start fewer or more ranks (e.g. deepspeed --num_gpus N)."
            )
        return self.head_layout(config, tp_size)

    # -- module matching -------------------------------------------------------
    @cached_property
    def _compiled(self) -> list[tuple[str, re.Pattern[str], Style]]:
        return [(glob, glob_to_regex(glob), style) for glob, style in self.layers.items()]

    def style_for(self, module_name: str) -> Style | None:
        for _, regex, style in self._compiled:
            if regex.fullmatch(module_name):
                return style
        return None

    def checkpoint_names(self, name: str) -> list[str]:
        """``name`` followed by its renamed forms, in the order to look them up."""
        names = [name]
        for pattern, replacement in self.checkpoint_renames:
            renamed = re.sub(pattern, replacement, names[-1])
            if renamed not in names:
                names.append(renamed)
        return names

    def unmatched_rules(self, module_names: Iterable[str]) -> list[str]:
        names = list(module_names)
        return [
            glob
            for glob, regex, _ in self._compiled
            if glob not in self.optional_layers and not any(regex.fullmatch(n) for n in names)
        ]


class LinearShape(NamedTuple):
    """What sharding needs to know of a linear layer, whichever class it is."""

    in_features: int
    out_features: int
    transposed: bool  # weight stored (in, out), as transformers' Conv1D stores it
    has_bias: bool


def linear_shape(module: nn.Module) -> LinearShape | None:
    """Shape of an ``nn.Linear`` or a transformers ``Conv1D``; None for anything else.

    One reader for the injector, the planner and the policy derivation, so
    they cannot disagree on which modules are linears or which way round.
    """
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return LinearShape(module.in_features, module.out_features, False, has_bias)
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2 and hasattr(module, "nf"):  # Conv1D
        return LinearShape(weight.shape[0], weight.shape[1], True, has_bias)
    return None


def require_linear_shape(module: nn.Module) -> LinearShape:
    """:func:`linear_shape`, or a TPConfigError: only linears can be split."""
    shape = linear_shape(module)
    if shape is None:
        raise TPConfigError(
            f"cannot shard {type(module).__name__}: only linear layers are supported"
        )
    return shape


def glob_to_regex(glob: str) -> re.Pattern[str]:
    """``model.layers.*.mlp`` -> regex where ``*`` is exactly one path component."""
    return re.compile(r"[^.]+".join(re.escape(piece) for piece in glob.split("*")))


def _head_count(config: Any, spec: HeadCount | None, field_name: str, required: bool) -> int | None:
    """A head count (or head size) as a policy declares it: None when ``spec`` is None, or
    when an optional attribute is missing or None. A TPConfigError names a bad value."""
    if spec is None:
        return None
    if isinstance(spec, str):
        value = getattr(config, spec, None)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TPConfigError(
                f"config has no integer {spec!r} (the policy's {field_name}); name the config "
                "attribute that holds it, or give an int or a callable of the config"
            )
        return value
    if callable(spec):
        try:
            value = spec(config)
        except Exception as exc:
            raise TPConfigError(
                f"the policy's {field_name} callable raised {type(exc).__name__}: {exc}"
            ) from exc
        if value is None and not required:
            return None
    else:
        value = spec
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TPConfigError(
            f"the policy's {field_name} gave {value!r}; it must be a positive int (or a config "
            "attribute's name, or a callable of the config returning one)"
        )
    return value


def _count_name(spec: HeadCount | None, fallback: str) -> str:
    """How problems name a head count: its config attribute, else what it counts."""
    return spec if isinstance(spec, str) else fallback


def _config_int(config: Any, attr: str) -> int:
    value = getattr(config, attr, None)
    if not isinstance(value, int):
        raise TPConfigError(f"config has no integer {attr!r}; the policy expects one")
    return value
