"""DeepSpeed-Inference ``injection_policy`` <-> dstp policy.

DeepSpeed's form is ``{DecoderLayerClass: ('self_attn.o_proj', 'mlp.down_proj')}``:
the named linears of each block are the ones whose output is all-reduced
(row-parallel); every other linear of the block is column-parallel. dstp reads
that form with the same shape rules as the automatic policy (which heads each
column layer holds) and writes it back for ``deepspeed.init_inference``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dstp.model.meta_model import meta_model

from .auto import assemble_policy, layers_from_block
from .base import Experts, Policy, Row, ShardedNorm, TPConfigError

InjectionPolicy = Mapping[Any, tuple[str, ...]]


def from_injection_policy(
    config: Any, injection_policy: InjectionPolicy, model: Any = None
) -> Policy:
    """A dstp policy from DeepSpeed's ``{BlockClass: row_linear_names}``.

    Block classes may be given as classes or as class names.
    """
    model = model if model is not None else meta_model(config)
    layers: dict = {}
    for block_class, row_names in injection_policy.items():
        block_list = _block_list_of(model, block_class)
        if isinstance(row_names, str):
            row_names = (row_names,)
        layers.update(layers_from_block(model, config, block_list, set(row_names)))
    names = ", ".join(_class_name(c) for c in injection_policy)
    return assemble_policy(
        model,
        config,
        layers,
        f"deepspeed:{names}",
        f"from a DeepSpeed injection_policy for {names}",
    )


def to_injection_policy(
    policy: Policy, config: Any, model: Any = None
) -> dict[type, tuple[str, ...]]:
    """``policy`` as ``{BlockClass: row_linear_names}`` for ``deepspeed.init_inference``."""
    model = model if model is not None else meta_model(config)
    result: dict[type, list[str]] = {}
    for glob, style in policy.layers.items():
        if isinstance(style, Experts):
            raise TPConfigError(
                f"{glob}: DeepSpeed's injection_policy has no form for fused MoE experts"
            )
        if isinstance(style, ShardedNorm):
            raise TPConfigError(
                f"{glob}: DeepSpeed's injection_policy has no form for a norm over a split width"
            )
        if not isinstance(style, Row):
            continue
        block_list, sep, relative = glob.partition(".*.")
        if not sep:
            raise TPConfigError(f"{glob}: not inside a list of blocks (no '.*.')")
        block_class = type(model.get_submodule(f"{block_list}.0"))
        result.setdefault(block_class, []).append(relative)
    if not result:
        raise TPConfigError(f"policy {policy.name!r} has no row-parallel layer to export")
    return {cls: tuple(names) for cls, names in result.items()}


def _class_name(block_class: Any) -> str:
    return block_class if isinstance(block_class, str) else block_class.__name__


def _block_list_of(model: Any, block_class: Any) -> str:
    """The ``ModuleList`` path whose items are ``block_class`` instances."""
    wanted = _class_name(block_class)
    for name, module in model.named_modules():
        if type(module).__name__ == wanted and (
            isinstance(block_class, str) or isinstance(module, block_class)
        ):
            parent, _, index = name.rpartition(".")
            if index.isdigit():
                return parent
    raise TPConfigError(
        f"{type(model).__name__} has no list of {wanted} blocks; injection_policy keys must be "
        "the decoder-layer class (e.g. LlamaDecoderLayer)"
    )
