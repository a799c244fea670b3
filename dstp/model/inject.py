"""Build the unmodified HF model on the meta device, swap in TP layers, load shards.

Order matters and is the whole point of this module:
1. read config.json and validate the TP size against the policy (no weights yet);
2. open the checkpoint's headers (missing / corrupt files fail here);
3. build the HF model with every parameter on ``meta`` (no memory);
4. replace the policy's modules by TP layers, still on ``meta``;
5. materialise each parameter at its *local* shape and fill it from the
   checkpoint slice its ``weight_loader`` selects.
No rank ever holds the full model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dstp.cpu import gemm as cpu_gemm
from dstp.cpu import heap, huge_pages
from dstp.cpu import kernels as cpu_kernels
from dstp.distributed import TPGroup
from dstp.model.fused_layers import fuse_decoder_layers
from dstp.model.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    load_replicated,
    partition_for,
)
from dstp.model.loading import Checkpoint, finish_staged_reads, load_config, release_free_heap
from dstp.model.meta_model import build_meta_model
from dstp.model.moe import shard_experts
from dstp.model.norms import column_parallel_norm, fused_replacements
from dstp.model.policy_proof import is_derived, prove_for_load
from dstp.model.stacked_source import StackedSource
from dstp.policies import (
    Col,
    Experts,
    HeadLayout,
    Policy,
    Row,
    ShardedNorm,
    TPConfigError,
    policy_for,
)
from dstp.policies.base import glob_to_regex, require_linear_shape
from dstp.worker.attention import ATTN_IMPLEMENTATION as PAGED_ATTENTION

log = logging.getLogger("dstp")


@dataclass
class ShardedModel:
    """What injection produced: the HF model plus the facts the engine needs."""

    model: nn.Module
    policy: Policy
    heads: HeadLayout
    config: Any
    checkpoint_bytes: int
    fused_layers: int = 0  # decoder layers running the policy's fused form

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


ALIBI_MODEL_TYPES = ("bloom",)  # ALiBi always, whatever the config says


def alibi_flag(config: Any) -> str | None:
    """The config setting that turns ALiBi on (``alibi=True``, MPT's ``attn_config.alibi``,
    ``position_embedding_type="alibi"``, a BLOOM model), or None when it is off."""
    if getattr(config, "model_type", None) in ALIBI_MODEL_TYPES:
        return f"model_type={config.model_type!r}: always"
    for attr in ("alibi", "use_alibi"):
        if getattr(config, attr, False) is True:
            return f"{attr}=True"
    attn_config = getattr(config, "attn_config", None)
    nested = (
        attn_config.get("alibi")
        if isinstance(attn_config, dict)
        else getattr(attn_config, "alibi", None)
    )
    if nested is True:
        return "attn_config.alibi=True"
    if getattr(config, "position_embedding_type", None) == "alibi":
        return "position_embedding_type='alibi'"
    return None


def check_attention_backend(config: Any, attn_implementation: str) -> None:
    """Refuse, before any weight is read, a model whose attention dstp cannot shard or page.

    ALiBi (any path): its per-head biases are built for all heads outside the attention
    modules, so a rank holding a slice of the heads would add the wrong ones. For the
    engine's paged attention: a model class that does not route attention through
    transformers' ``AttentionInterface`` (its ``_supports_attention_backend``); what
    that flag cannot see (remote code) the start-up probe catches, which requires
    every layer's attention to reach the paged cache.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    flag = alibi_flag(config)
    if flag is not None:
        raise TPConfigError(
            f"{type(config).__name__} uses ALiBi ({flag}): its per-head position biases are "
            "built for all heads outside the attention modules, so neither a head-sharded "
            "forward nor the engine's paged KV cache can apply them; dstp does not serve "
            "ALiBi models"
        )
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if attn_implementation == PAGED_ATTENTION and not getattr(
        model_class, "_supports_attention_backend", True
    ):
        raise TPConfigError(
            f"{model_class.__name__} does not route attention through transformers' AttentionInterface, "
            "so the engine's paged KV cache cannot plug into it. dstp.load() still serves it (with HF "
            "generate); for the engine, use an architecture whose HF class supports attention backends."
        )


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class LocalConfigView:
    """The model config as one attention module must see it: a few attributes local.

    Reads fall through to the shared config (so later changes such as
    ``_attn_implementation`` stay visible); writes go to the shared config.
    """

    def __init__(self, base: Any, overrides: dict[str, int]) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name: str) -> Any:
        # the instance dict, not object.__getattribute__: torch.compile traces the one and
        # breaks its graph at the other (--compile-decode, Phi-3's attention reads its config)
        fields = self.__dict__
        overrides = fields.get("_overrides", {})
        if name in overrides:
            return overrides[name]
        if "_base" not in fields:  # a half-built copy: no recursion through __getattr__
            raise AttributeError(name)
        return getattr(fields["_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_base"), name, value)

    def __repr__(self) -> str:
        return f"LocalConfigView({self._overrides})"


def _linear_layer(
    module: nn.Module, style: Col | Row, heads: HeadLayout, tp: TPGroup, dtype: torch.dtype
) -> nn.Module:
    in_f, out_f, _, bias = require_linear_shape(module)
    if isinstance(style, Col):
        part = partition_for(style.parts, out_f, heads, tp.rank, tp.size)
        return ColumnParallelLinear(
            in_f,
            part,
            bias,
            tp,
            transposed=style.transposed,
            gather_output=style.gather_output,
            dtype=dtype,
        )
    part = partition_for(style.parts, in_f, heads, tp.rank, tp.size)
    return RowParallelLinear(part, out_f, bias, tp, transposed=style.transposed, dtype=dtype)


def swap_modules(
    model: nn.Module, policy: Policy, heads: HeadLayout, tp: TPGroup, dtype: torch.dtype
) -> int:
    """Replace the policy's modules with TP layers; returns how many were swapped."""
    names = [name for name, _ in model.named_modules()]
    unmatched = policy.unmatched_rules(names)
    if unmatched:
        raise TPConfigError(
            f"policy {policy.name!r} rules match no module of {type(model).__name__}: {unmatched}. "
            f"Module names look like {[n for n in names if n.count('.') >= 3][:4]}"
        )
    swapped = 0
    for name in names:
        style = policy.style_for(name)
        if style is None:
            continue
        module = model.get_submodule(name)
        try:
            if isinstance(style, Experts):
                shard_experts(name, module, style, heads, tp, dtype)
            elif isinstance(style, ShardedNorm):
                _set_module(model, name, column_parallel_norm(module, style, heads, tp, dtype))
            else:
                _set_module(model, name, _linear_layer(module, style, heads, tp, dtype))
        except ValueError as exc:
            raise TPConfigError(
                f"policy {policy.name!r} does not fit module {name}: {exc}"
            ) from exc
        swapped += 1

    if policy.embedding:
        emb = model.get_submodule(policy.embedding)
        scale = getattr(emb, policy.embedding_scale) if policy.embedding_scale else None
        _set_module(
            model,
            policy.embedding,
            VocabParallelEmbedding(
                emb.num_embeddings, emb.embedding_dim, tp, dtype, scale=_scalar(scale)
            ),
        )
    if policy.lm_head:
        head = model.get_submodule(policy.lm_head)
        in_f, out_f, _, bias = require_linear_shape(head)
        _set_module(model, policy.lm_head, ParallelLMHead(out_f, in_f, bias, tp, dtype))
    if policy.attention:
        _localise_attention(model, policy, heads)
    return swapped


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _localise_attention(model: nn.Module, policy: Policy, heads: HeadLayout) -> None:
    """Give each attention module its local head counts (attributes and config view)."""
    regex = glob_to_regex(policy.attention)
    config_overrides = {
        attr: heads.quantity(quantity) for attr, quantity in policy.attention_config.items()
    }
    matched = 0
    for name, module in model.named_modules():
        if not regex.fullmatch(name):
            continue
        matched += 1
        for attr, quantity in policy.attention_attrs.items():
            if not hasattr(module, attr):
                raise TPConfigError(
                    f"policy {policy.name!r}: attention module {name} has no attribute {attr!r}"
                )
            setattr(module, attr, heads.quantity(quantity))
        if config_overrides:
            module.config = LocalConfigView(module.config, config_overrides)
    if not matched:
        raise TPConfigError(
            f"policy {policy.name!r}: attention glob {policy.attention!r} matches no module"
        )


def _tied(config: Any) -> bool:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text_config, "tie_word_embeddings", False))


def _checkpoint_name(name: str, ckpt: Checkpoint, prefix: str, policy: Policy) -> str | None:
    """The checkpoint key for a model parameter name.

    Tries the name, then the policy's renames; each also without the base-model
    prefix (base-model checkpoints lack it).
    """
    for candidate in policy.checkpoint_names(name):
        if candidate in ckpt:
            return candidate
        if prefix and candidate.startswith(prefix + ".") and candidate[len(prefix) + 1 :] in ckpt:
            return candidate[len(prefix) + 1 :]
    return None


def _checkpoint_source(
    name: str, param: torch.Tensor, ckpt: Checkpoint, prefix: str, policy: Policy
) -> Any:
    """A lazy handle for ``name``: the tensor itself, or a fused view of per-expert tensors."""
    key = _checkpoint_name(name, ckpt, prefix, policy)
    if key is not None:
        return ckpt.get(key)
    unfused = getattr(param, "unfused_keys", None)
    if unfused:
        keys = [[_checkpoint_name(k, ckpt, prefix, policy) for k in row] for row in unfused]
        missing = [
            k
            for row, krow in zip(unfused, keys, strict=True)
            for k, f in zip(row, krow, strict=True)
            if f is None
        ]
        if not missing:
            return StackedSource([[ckpt.get(k) for k in row] for row in keys])
        raise TPConfigError(
            f"checkpoint at {ckpt.path} has neither {name!r} nor its per-expert tensors "
            f"(first missing: {policy.checkpoint_names(missing[0])})"
        )
    raise TPConfigError(
        f"checkpoint at {ckpt.path} has no tensor for parameter {name!r} "
        f"(looked for {policy.checkpoint_names(name)}); is this checkpoint for this architecture?"
    )


def _load_persistent_buffers(
    model: nn.Module, ckpt: Checkpoint, prefix: str, policy: Policy, tp: TPGroup
) -> None:
    """Persistent buffers the checkpoint holds, replicated (DeepSeek-V3's router
    ``e_score_correction_bias``); the meta build leaves them at their ``__init__`` values."""
    for name, buf in list(model.named_buffers()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._non_persistent_buffers_set:
            continue
        key = _checkpoint_name(name, ckpt, prefix, policy)
        if key is None:
            continue
        real = torch.empty(buf.shape, dtype=buf.dtype, device=tp.device)
        with torch.no_grad():
            load_replicated(real, ckpt.get(key))
        module._buffers[attr] = real


def materialize(
    model: nn.Module,
    ckpt: Checkpoint,
    policy: Policy,
    tp: TPGroup,
    dtype: torch.dtype,
    config: Any,
    *,
    progress: bool = True,
) -> None:
    """Allocate each parameter at its local shape on ``tp.device`` and fill it from the checkpoint."""
    tied = _tied(config) and policy.embedding and policy.lm_head
    head_weight = f"{policy.lm_head}.weight" if policy.lm_head else None
    prefix = getattr(model, "base_model_prefix", "")
    params = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]
    bar = tqdm(
        params,
        desc=f"loading shards (TP={tp.size})",
        unit="tensor",
        disable=not (progress and tp.is_driver),
        leave=False,
    )
    for name, param in bar:
        if tied and name == head_weight:
            continue  # shares the embedding's shard, set below
        source = _checkpoint_source(name, param, ckpt, prefix, policy)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        loader = getattr(param, "weight_loader", None)
        real_dtype = dtype if param.dtype.is_floating_point else param.dtype
        # The loaded parameter does not keep the loader: a TP layer's loader is a method
        # bound to the layer that owns the parameter, a reference cycle, so a layer
        # dropped later (the q/k/v and gate/up a fused layer packs) would stay resident
        # until Python's cyclic GC happened to run (1.2 GB of a 1B model, 2026-12-03).
        real = nn.Parameter(
            torch.empty(param.shape, dtype=real_dtype, device=tp.device), requires_grad=False
        )
        with torch.no_grad():
            (loader or load_replicated)(real, source)
        module._parameters[attr] = real
    if tied:
        head = model.get_submodule(policy.lm_head)
        head.weight = model.get_submodule(policy.embedding).weight
    _load_persistent_buffers(model, ckpt, prefix, policy, tp)
    for module in model.modules():  # non-persistent buffers (rotary tables) to the device
        for bname, buf in list(module._buffers.items()):
            if buf is not None and buf.device != tp.device:
                module._buffers[bname] = buf.to(tp.device)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise TPConfigError(f"parameters never loaded: {leftover[:5]}")


def _fuse_rms_norms(model: nn.Module) -> None:
    """Swap each RMSNorm the CPU kernel reproduces for one kernel call (:mod:`dstp.model.norms`)."""
    swapped = 0
    for name, fused in list(fused_replacements(model)):
        _set_module(model, name, fused)
        swapped += 1
    log.debug("%d RMSNorm modules run dstp's CPU kernel", swapped)


def shard_model(
    path: str,
    tp: TPGroup,
    dtype: torch.dtype = torch.float32,
    *,
    policy: Policy | None = None,
    attn_implementation: str = "sdpa",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    fused_layers: bool = True,
) -> ShardedModel:
    """Everything in the module docstring, with errors raised on every rank together.

    ``fused_layers``: swap decoder layers for the policy's fused form where each proves
    equal to HF's (dstp.model.fused_layers); False keeps HF's layers everywhere.
    """
    config = tp.agree(lambda: load_config(path, trust_remote_code))
    # what no policy can fix is said first, before a policy is derived or a weight is read
    tp.agree(lambda: check_attention_backend(config, attn_implementation))
    policy = policy or tp.agree(lambda: policy_for(config))
    heads = tp.agree(lambda: policy.validate(config, tp.size))
    if is_derived(policy):  # proven on a shrunk copy against HF before any weight is read
        prove_for_load(config, policy, tp)
    ckpt = tp.agree(lambda: Checkpoint(path, allow_pickle=allow_pickle))
    # A policy may need one of HF's kernels (Gemma 2: eager, for soft-capping);
    # dstp's paged kernel does soft-capping and sliding windows itself.
    needs = policy.attn_implementation
    if needs and attn_implementation not in (needs, PAGED_ATTENTION):
        log.info(
            "policy %r requires attn_implementation=%r (asked: %r)",
            policy.name,
            needs,
            attn_implementation,
        )
        attn_implementation = needs
        check_attention_backend(config, attn_implementation)
    model = build_meta_model(config, dtype, attn_implementation)
    tp.agree(lambda: swap_modules(model, policy, heads, tp, dtype))
    tp.agree(lambda: materialize(model, ckpt, policy, tp, dtype, config))
    finish_staged_reads()
    if dtype == torch.bfloat16 and tp.device.type == "cpu":
        cpu_kernels.available()  # build the batch-1 GEMV now, not on the first request
        cpu_gemm.settle(tp.min_over_ranks)  # "auto": time bf16 against widened fp32 once
        cpu_kernels.settle_few_rows(tp.min_over_ranks)  # AVX512-BF16: vdpbf16ps or fp32 FMAs
        _fuse_rms_norms(model)
    fused = tp.agree(lambda: fuse_decoder_layers(model, policy, tp)) if fused_layers else 0
    # after the fusing, not before it: its probes and packed copies leave freed heap
    # (~200 MB of a 1B model) that glibc keeps resident until trimmed
    release_free_heap()
    if tp.device.type == "cpu":
        huge_pages.collapse(model.parameters())  # decode streams them: fewer TLB misses
        heap.keep_freed_memory()  # from here on, activations reuse the heap: no page faults
    sharded = ShardedModel(model, policy, heads, config, ckpt.nbytes(), fused)
    if tp.is_driver:
        log.info(
            "loaded %s with policy %r at TP=%d: %d/%d query heads, %d/%d KV heads per rank "
            "(each KV head on %d rank(s)), %.1f MiB of parameters per rank, %d/%d decoder "
            "layers fused",
            type(model).__name__,
            policy.name,
            tp.size,
            heads.local_heads,
            heads.num_heads,
            heads.local_kv_heads,
            heads.num_kv_heads,
            heads.kv_replicas,
            sharded.parameter_bytes() / 2**20,
            fused,
            getattr(config, "num_hidden_layers", 0),
        )
    return sharded
