"""Policies derived for architectures that have no explicit one.

Two sources, tried in order:

1. ``config.base_model_tp_plan`` (transformers' own TP plan): its globs are
   relative to the base model, so they get the ``base_model_prefix``;
   ``colwise``/``rowwise`` (and their packed / gather variants) become
   ``Col``/``Row``, ``moe_tp_experts`` becomes ``Experts``, replicated
   styles are left alone.
2. The module graph of the repeated decoder block: within each sub-module
   (attention, MLP, or the block itself) the last linear that returns to the
   hidden size feeds the residual stream and is row-parallel; the other
   linears of that sub-module are column-parallel. A sub-module with one
   linear stays replicated.

Either way the split ``parts`` come from shapes: in a sub-module whose row
layer reads ``heads * head_dim``, column outputs of ``heads``/``kv_heads``
size are head-split, a fused ``heads + 2 * kv_heads`` one is ``(q, kv, kv)``;
everything else splits evenly. Layouts that shapes cannot tell apart (a fused
MHA ``3 * hidden`` projection: per-head interleaved or blocked?) are refused
with the fix, never guessed.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from dstp.model.meta_model import meta_model

from .base import (
    Col,
    Experts,
    HeadLayout,
    LogitOp,
    Policy,
    Row,
    ShardedNorm,
    Style,
    TPConfigError,
    glob_to_regex,
    linear_shape,
)

COLUMN_STYLES = {"colwise", "local_colwise"}
PACKED_COLUMN_STYLES = {"packed_colwise", "colwise_gather_output", "local_packed_colwise"}
ROW_STYLES = {"rowwise", "local_rowwise", "rowwise_split_input", "packed_rowwise"}
EXPERT_STYLES = {"moe_tp_experts"}
IGNORED_STYLES = {
    "replicated_with_grad_allreduce",
    "embedding_rowwise",  # the embedding is found from get_input_embeddings()
    "sequence_parallel",
    "isolate",
    "gather",
    "local",
}

# attention-module attributes HF code reshapes with -> the local quantity;
# set only where the module has the attribute at its full-model value
ATTENTION_ATTRS = {
    "num_key_value_groups": "kv_groups",
    "num_heads": "local_heads",
    "num_attention_heads": "local_heads",
    "num_key_value_heads": "local_kv_heads",
    "split_size": "local_hidden",
}
# the scaled embeddings' constant (Gemma 3's scalar_embed_scale; BioGPT's, BART-style
# decoders' embed_scale): the parallel embedding must multiply by it too
EMBEDDING_SCALE_ATTRS = ("scalar_embed_scale", "embed_scale")
MLP_WIDTH_ATTRS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
# config attributes a *ForCausalLM.forward may apply to its logits, in HF's order. A
# derived policy takes one only where that forward reads it (MPT's config has a
# logit_scale its model ignores), and a scaling's operator from that code
# (Granite divides by logits_scaling, HyperCLOVA X multiplies).
LOGIT_ATTRS = {
    "logit_scale": "multiply",  # Cohere
    "logits_scaling": "divide",  # Granite
    "final_logit_softcapping": "softcap",  # Gemma 2/3
    "logits_soft_cap": "softcap",  # RecurrentGemma
}


@dataclass(frozen=True)
class LinearInfo:
    """A linear layer of the block, as the derivation sees it."""

    name: str  # full module name
    in_features: int
    out_features: int
    transposed: bool


def derive_policy(config: Any, model: Any = None) -> Policy:
    """A policy for ``config``'s architecture from its TP plan, else its module graph."""
    model = model if model is not None else meta_model(config)
    plan = getattr(config, "base_model_tp_plan", None) or {}
    if plan:
        layers, why = _layers_from_tp_plan(model, plan), "config.base_model_tp_plan"
    else:
        block_list = decoder_block_list(model)
        block = model.get_submodule(f"{block_list}.0")
        rows = residual_linears(block)
        layers = layers_from_block(model, config, block_list, rows)
        why = f"the module graph of {type(block).__name__} (row-parallel: {sorted(rows)})"
    return assemble_policy(
        model, config, layers, f"auto:{config.model_type}", f"derived from {why}"
    )


def full_heads(config: Any) -> HeadLayout:
    """Head counts of the whole model, read with the attribute names most configs use."""
    probe = Policy(
        name="probe",
        architectures=(),
        model_types=(),
        layers={},
        kv_heads_attr="num_key_value_heads"
        if isinstance(getattr(config, "num_key_value_heads", None), int)
        else None,
        head_dim_attr="head_dim",
    )
    return probe.head_layout(config, 1)


# -- linears and their names --------------------------------------------------
def linear_info(name: str, module: Any) -> LinearInfo | None:
    """``module``'s :func:`linear_shape` under its name; None for anything but a linear."""
    shape = linear_shape(module)
    if shape is None:
        return None
    return LinearInfo(name, shape.in_features, shape.out_features, shape.transposed)


def decoder_block_list(model: Any) -> str:
    """Name of the longest ``ModuleList`` of same-class modules: the decoder blocks."""
    best, best_len = None, 0
    for name, module in model.named_modules():
        uniform = isinstance(module, nn.ModuleList) and len({type(m) for m in module}) == 1
        if uniform and len(module) > best_len:
            best, best_len = name, len(module)
    if best is None:
        raise TPConfigError(f"{type(model).__name__} has no list of decoder blocks")
    return best


def block_linears(block: Any, prefix: str = "") -> list[LinearInfo]:
    found = []
    for name, module in block.named_modules():
        info = linear_info(f"{prefix}{name}", module)
        if info is not None:
            found.append(info)
    return found


def residual_linears(block: Any) -> set[str]:
    """Names (relative to the block) of the linears that feed the residual stream."""
    hidden = _hidden_size(block_linears(block))
    rows = set()
    for group in _groups(block_linears(block)).values():
        if len(group) < 2:
            continue
        returning = [info for info in group if info.out_features == hidden]
        if returning:
            rows.add(returning[-1].name)
    return rows


def _hidden_size(linears: list[LinearInfo]) -> int:
    """The most common input width of the block's linears: the residual width."""
    widths = [info.in_features for info in linears]
    if not widths:
        raise TPConfigError("the decoder block has no linear layers to split")
    return max(set(widths), key=widths.count)


def _groups(linears: Iterable[LinearInfo]) -> dict[str, list[LinearInfo]]:
    groups: dict[str, list[LinearInfo]] = {}
    for info in linears:
        groups.setdefault(info.name.rpartition(".")[0], []).append(info)
    return groups


# -- parts from shapes --------------------------------------------------------
def column_parts(
    out: int, heads: HeadLayout, attention: bool, packed: bool | None, row_in: int
) -> tuple[str, ...]:
    """Parts of a column layer's output; ``packed`` None means the layout is unknown.

    ``row_in`` is the input width of the group's row layer: an MLP column
    layer ``k`` times as wide holds ``k`` fused projections (gate|up).
    """
    if not attention:
        return ("even",) * (out // row_in) if row_in and out % row_in == 0 else ("even",)
    q, kv = heads.num_heads * heads.head_dim, heads.num_kv_heads * heads.head_dim
    if out == q:
        return ("q",)
    if out == kv:
        return ("kv",)
    fused_qkv = out == q + 2 * kv
    if packed is None and (out % q == 0 or fused_qkv) and not (fused_qkv and kv != q):
        raise TPConfigError(
            f"a fused projection of {out} features ({out / q:g} x {q}) may be per-head "
            "interleaved or blocked q|k|v; shapes cannot tell. Write a policy with "
            "Col(('q:3',)) or Col(('q', 'kv', 'kv')) for it (docs/writing-a-policy.md)"
        )
    if fused_qkv and packed is not False:
        return ("q", "kv", "kv")
    if out % q == 0:
        return (f"q:{out // q}",)
    return ("even",)


def _styles_for_group(
    group: list[LinearInfo], kinds: Mapping[str, str], heads: HeadLayout
) -> dict[str, Style]:
    """``kinds``: linear name -> "col" / "packed" / "row" (others stay replicated)."""
    q = heads.num_heads * heads.head_dim
    attention = any(kinds.get(i.name) == "row" and i.in_features == q for i in group)
    row_in = next((i.in_features for i in group if kinds.get(i.name) == "row"), 0)
    styles: dict[str, Style] = {}
    for info in group:
        kind = kinds.get(info.name)
        if kind == "row":
            parts = ("q",) if attention and info.in_features == q else ("even",)
            styles[info.name] = Row(parts, transposed=info.transposed)
        elif kind in ("col", "packed", "unknown"):
            packed = {"col": False, "packed": True, "unknown": None}[kind]
            parts = column_parts(info.out_features, heads, attention, packed, row_in)
            styles[info.name] = Col(parts, transposed=info.transposed)
    return styles


# -- the two derivations ------------------------------------------------------
def layers_from_block(model: Any, config: Any, block_list: str, rows: set[str]) -> dict[str, Style]:
    """Rules for block 0 (``rows`` row-parallel, siblings column), generalised to every block."""
    block = model.get_submodule(f"{block_list}.0")
    heads = full_heads(config)
    layers: dict[str, Style] = {}
    for group in _groups(block_linears(block)).values():
        row_names = {i.name for i in group if i.name in rows}
        if not row_names:
            continue
        kinds = {i.name: "row" if i.name in row_names else "unknown" for i in group}
        for name, style in _styles_for_group(group, kinds, heads).items():
            layers[f"{block_list}.*.{name}"] = style
    unknown = rows - {name.split(".*.", 1)[1] for name in layers}
    if unknown:
        raise TPConfigError(f"row-parallel names match no linear of the block: {sorted(unknown)}")
    return layers


def _layers_from_tp_plan(model: Any, plan: Mapping[str, str]) -> dict[str, Style]:
    prefix = getattr(model, "base_model_prefix", "")
    names = [name for name, _ in model.named_modules()]
    kinds: dict[str, str] = {}
    experts: list[str] = []
    unknown_styles = set()
    for glob, style in plan.items():
        full = f"{prefix}.{glob}" if prefix else glob
        regex = glob_to_regex(full)
        matched = [n for n in names if regex.fullmatch(n)]
        if style in EXPERT_STYLES:
            experts.append(full)
        elif style in IGNORED_STYLES or not matched:
            continue  # parameters of an experts module, or a replicated module
        elif style in COLUMN_STYLES | PACKED_COLUMN_STYLES | ROW_STYLES:
            kind = (
                "row"
                if style in ROW_STYLES
                else "packed"
                if style in PACKED_COLUMN_STYLES
                else "col"
            )
            for name in matched:
                kinds[name] = kind
        else:
            unknown_styles.add(style)
    if unknown_styles:
        raise TPConfigError(
            f"base_model_tp_plan uses styles dstp does not know: {sorted(unknown_styles)}"
        )
    heads = full_heads(model.config)
    linears = [info for n in kinds if (info := linear_info(n, model.get_submodule(n)))]
    styles: dict[str, Style] = {}
    for group in _groups(linears).values():
        styles.update(_styles_for_group(group, kinds, heads))
    layers = _generalise(styles)
    for glob in experts:
        layers[glob] = Experts()
    return layers


def _generalise(styles: Mapping[str, Style]) -> dict[str, Style]:
    """``model.layers.3.mlp.up`` rules -> ``model.layers.*.mlp.up`` (one per distinct rule)."""
    layers: dict[str, Style] = {}
    for name, style in styles.items():
        glob = ".".join("*" if piece.isdigit() else piece for piece in name.split("."))
        if layers.setdefault(glob, style) != style:
            raise TPConfigError(
                f"blocks disagree on how to split {glob}: {layers[glob]} vs {style}"
            )
    return layers


# -- from rules to a Policy -----------------------------------------------------
def assemble_policy(
    model: Any, config: Any, layers: dict[str, Style], name: str, doc: str
) -> Policy:
    """Complete ``layers`` with embedding, LM head, attention attributes and validation fields."""
    if not layers:
        raise TPConfigError(f"{type(model).__name__}: no layer to split was found")
    heads = full_heads(config)
    module_names = {id(m): n for n, m in model.named_modules()}
    embedding = _named(model, "get_input_embeddings", module_names)
    lm_head = _named(model, "get_output_embeddings", module_names)
    attention = _attention_glob(layers, heads)
    if attention:
        layers = {**layers, **full_width_norms(model, layers, heads, attention)}
    attention_attrs: dict[str, str] = {}
    if attention:
        regex = glob_to_regex(attention)
        module = next(m for n, m in model.named_modules() if regex.fullmatch(n))
        for attr, quantity in ATTENTION_ATTRS.items():
            if getattr(module, attr, None) == heads.quantity(quantity):
                attention_attrs[attr] = quantity
    scale_attr = None
    if embedding:
        emb = model.get_submodule(embedding)
        scale_attr = next((a for a in EMBEDDING_SCALE_ATTRS if hasattr(emb, a)), None)
    return Policy(
        name=name,
        architectures=tuple(getattr(config, "architectures", None) or ()),
        model_types=(config.model_type,),
        layers=layers,
        embedding=embedding,
        lm_head=lm_head,
        attention=attention,
        attention_attrs=attention_attrs,
        kv_heads_attr="num_key_value_heads"
        if isinstance(getattr(config, "num_key_value_heads", None), int)
        else None,
        head_dim_attr="head_dim",
        embedding_scale=scale_attr,
        attn_implementation=None if getattr(model, "_supports_sdpa", False) else "eager",
        divisible=tuple(a for a in MLP_WIDTH_ATTRS if isinstance(getattr(config, a, None), int)),
        logits=logit_steps(model, config),
        doc=doc,
    )


def full_width_norms(
    model: Any, layers: Mapping[str, Style], heads: HeadLayout, attention: str
) -> dict[str, ShardedNorm]:
    """``ShardedNorm`` rules for attention norms that span a column layer's whole width.

    A norm module of the ``attention`` modules whose weight is as wide as one
    of their column-parallel outputs normalises that whole split activation
    (OLMo2's ``q_norm``/``k_norm`` over ``heads * head_dim``): replicated, it
    would crash at the first request. An RMSNorm gets the column layer's
    parts; any other norm (mean-subtracting, biased) is refused.
    """
    names = [n for n, _ in model.named_modules()]
    found: dict[str, ShardedNorm] = {}
    columns: dict[str, dict[int, set[tuple[str, ...]]]] = {}  # parent glob -> width -> parts
    for glob, style in layers.items():
        if not isinstance(style, Col):
            continue
        regex = glob_to_regex(glob)
        name = next((n for n in names if regex.fullmatch(n)), None)
        shape = linear_shape(model.get_submodule(name)) if name else None
        if shape is None:
            continue
        parts = (
            ("q",)
            if style.parts == ("kv",) and heads.num_kv_heads == heads.num_heads
            else style.parts
        )
        parent = glob.rpartition(".")[0]
        if parent != attention:
            continue
        columns.setdefault(parent, {}).setdefault(shape.out_features, set()).add(parts)
    for parent, widths in columns.items():
        regex = glob_to_regex(parent)
        module = next((m for n, m in model.named_modules() if regex.fullmatch(n)), None)
        for child_name, child in module.named_children() if module is not None else ():
            weight = getattr(child, "weight", None)
            if "Norm" not in type(child).__name__ or not isinstance(weight, nn.Parameter):
                continue
            if weight.dim() != 1 or weight.shape[0] not in widths:
                continue
            glob = f"{parent}.{child_name}"
            options = widths[weight.shape[0]]
            rms = "RMS" in type(child).__name__ and getattr(child, "bias", None) is None
            if not rms or len(options) != 1:
                raise TPConfigError(
                    f"{glob} ({type(child).__name__}) normalises the whole width of a "
                    "column-split activation and dstp cannot tell how to split it"
                    f"{'' if rms else ' (not an RMSNorm)'}; write a policy "
                    "(docs/writing-a-policy.md, ShardedNorm)"
                )
            found[glob] = ShardedNorm(next(iter(options)))
    return found


def logit_steps(model: Any, config: Any) -> tuple[LogitOp, ...]:
    """The :data:`LOGIT_ATTRS` steps ``type(model).forward`` applies after its LM head."""
    try:
        source = re.sub(r"#.*", "", inspect.getsource(type(model).forward))
    except (OSError, TypeError):  # no source to read: trust the config alone
        source = None
    steps = []
    for attr, kind in LOGIT_ATTRS.items():
        if not hasattr(config, attr):
            continue
        if source is not None:
            if not re.search(rf"\b{attr}\b", source):
                continue
            ops = set(re.findall(rf"([*/])\s*[\w.()]*?\b{attr}\b", source))
            if kind != "softcap" and len(ops) == 1:
                kind = "multiply" if ops == {"*"} else "divide"
            elif kind != "softcap" or "tanh" not in source:
                raise TPConfigError(
                    f"{type(model).__name__}.forward uses config.{attr} in a way dstp cannot "
                    "read; write a policy with its 'logits' steps (docs/writing-a-policy.md)"
                )
        steps.append(LogitOp(kind, attr))
    return tuple(steps)


def _named(model: Any, getter: str, module_names: Mapping[int, str]) -> str | None:
    module = getattr(model, getter)()
    if module is None or id(module) not in module_names:
        return None
    if getter == "get_input_embeddings" and not isinstance(module, nn.Embedding):
        return None
    return module_names[id(module)]


def _attention_glob(layers: Mapping[str, Style], heads: HeadLayout) -> str | None:
    """The parent of the row layers that read query heads: the attention modules."""
    parents = {
        glob.rpartition(".")[0]
        for glob, style in layers.items()
        if isinstance(style, Row) and style.parts == ("q",)
    }
    return parents.pop() if len(parents) == 1 else None
