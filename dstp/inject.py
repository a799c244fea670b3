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

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dstp.policies import Col, HeadLayout, Policy, Row, TPConfigError, policy_for

from .distributed import TPGroup
from .layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    load_replicated,
    partition_for,
)
from .loading import Checkpoint

log = logging.getLogger("dstp")


@dataclass
class ShardedModel:
    """What injection produced: the HF model plus the facts the engine needs."""

    model: nn.Module
    policy: Policy
    heads: HeadLayout
    config: Any
    checkpoint_bytes: int

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def load_config(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device; buffers stay real.

    Non-persistent buffers (rotary ``inv_freq``) are computed in ``__init__``
    and are not in checkpoints, so they must survive the meta build.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_meta_model(config: Any, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    return model.eval()


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in, out, has_bias) of an nn.Linear or a transposed GPT-2 style Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2 and hasattr(module, "nf"):  # transformers Conv1D
        return weight.shape[0], weight.shape[1], getattr(module, "bias", None) is not None
    raise TPConfigError(f"cannot shard {type(module).__name__}: only linear layers are supported")


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
        in_f, out_f, bias = _linear_shape(module)
        try:
            if isinstance(style, Col):
                part = partition_for(style.parts, out_f, heads, tp.rank, tp.size)
                new: nn.Module = ColumnParallelLinear(
                    in_f,
                    part,
                    bias,
                    tp,
                    transposed=style.transposed,
                    gather_output=style.gather_output,
                    dtype=dtype,
                )
            elif isinstance(style, Row):
                part = partition_for(style.parts, in_f, heads, tp.rank, tp.size)
                new = RowParallelLinear(
                    part, out_f, bias, tp, transposed=style.transposed, dtype=dtype
                )
            else:  # pragma: no cover - Policy only holds Col/Row
                raise TPConfigError(f"unknown style {style!r}")
        except ValueError as exc:
            raise TPConfigError(
                f"policy {policy.name!r} does not fit module {name}: {exc}"
            ) from exc
        _set_module(model, name, new)
        swapped += 1

    if policy.embedding:
        emb = model.get_submodule(policy.embedding)
        _set_module(
            model,
            policy.embedding,
            VocabParallelEmbedding(emb.num_embeddings, emb.embedding_dim, tp, dtype),
        )
    if policy.lm_head:
        head = model.get_submodule(policy.lm_head)
        in_f, out_f, bias = _linear_shape(head)
        _set_module(model, policy.lm_head, ParallelLMHead(out_f, in_f, bias, tp, dtype))
    if policy.attention:
        from dstp.policies.base import glob_to_regex

        regex = glob_to_regex(policy.attention)
        for name, module in model.named_modules():
            if regex.fullmatch(name):
                for attr, quantity in policy.attention_attrs.items():
                    setattr(module, attr, heads.quantity(quantity))
    return swapped


def _tied(config: Any) -> bool:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text_config, "tie_word_embeddings", False))


def _checkpoint_name(name: str, ckpt: Checkpoint, prefix: str) -> str | None:
    """The checkpoint key for a model parameter name (base-model checkpoints lack the prefix)."""
    if name in ckpt:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in ckpt:
        return name[len(prefix) + 1 :]
    return None


def materialize(
    model: nn.Module, ckpt: Checkpoint, policy: Policy, tp: TPGroup, dtype: torch.dtype, config: Any
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
        disable=not tp.is_driver,
        leave=False,
    )
    for name, param in bar:
        if tied and name == head_weight:
            continue  # shares the embedding's shard, set below
        key = _checkpoint_name(name, ckpt, prefix)
        if key is None:
            raise TPConfigError(
                f"checkpoint at {ckpt.path} has no tensor for parameter {name!r}; "
                "is this checkpoint for this architecture?"
            )
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        loader = getattr(param, "weight_loader", None)
        real_dtype = dtype if param.dtype.is_floating_point else param.dtype
        real = nn.Parameter(
            torch.empty(param.shape, dtype=real_dtype, device=tp.device), requires_grad=False
        )
        if loader is not None:
            real.weight_loader = loader
        source = ckpt.get(key)
        with torch.no_grad():
            (loader or load_replicated)(real, source)
        module._parameters[attr] = real
    if tied:
        head = model.get_submodule(policy.lm_head)
        head.weight = model.get_submodule(policy.embedding).weight
    for module in model.modules():  # non-persistent buffers (rotary tables) to the device
        for bname, buf in list(module._buffers.items()):
            if buf is not None and buf.device != tp.device:
                module._buffers[bname] = buf.to(tp.device)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise TPConfigError(f"parameters never loaded: {leftover[:5]}")


def shard_model(
    path: str,
    tp: TPGroup,
    dtype: torch.dtype = torch.float32,
    *,
    policy: Policy | None = None,
    attn_implementation: str = "sdpa",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> ShardedModel:
    """Everything in the module docstring, with errors raised on every rank together."""
    config = tp.agree(lambda: load_config(path, trust_remote_code))
    policy = policy or tp.agree(lambda: policy_for(config))
    heads = tp.agree(lambda: policy.validate(config, tp.size))
    ckpt = tp.agree(lambda: Checkpoint(path, allow_pickle=allow_pickle))
    model = build_meta_model(config, dtype, attn_implementation)
    tp.agree(lambda: swap_modules(model, policy, heads, tp, dtype))
    tp.agree(lambda: materialize(model, ckpt, policy, tp, dtype, config))
    sharded = ShardedModel(model, policy, heads, config, ckpt.nbytes())
    if tp.is_driver:
        log.info(
            "loaded %s with policy %r at TP=%d: %d/%d query heads, %d/%d KV heads per rank "
            "(each KV head on %d rank(s)), %.1f MiB of parameters per rank",
            type(model).__name__,
            policy.name,
            tp.size,
            heads.local_heads,
            heads.num_heads,
            heads.local_kv_heads,
            heads.num_kv_heads,
            heads.kv_replicas,
            sharded.parameter_bytes() / 2**20,
        )
    return sharded
