"""``dstp inspect``: what dstp would do to a model at a TP size, without reading weights.

Shows the policy in use and why (registered for the architecture, or derived
and from what), the head layout per rank, every split module of one decoder
block with its per-rank shape, the parameter bytes each rank holds, and, when
the TP size is invalid, why and which sizes are valid.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import torch

from dstp.model.loading import load_config
from dstp.model.meta_model import meta_model
from dstp.tools.planner import DTYPE_BYTES, GIB, parameter_bytes_per_rank


def virtual_tp(rank: int, size: int) -> Any:
    """A TP group that only knows its place: enough to build shards on the meta device."""
    from dstp.distributed import TPGroup

    return TPGroup(rank, size, rank, size, torch.device("meta"), None, False)


def policy_origin(policy: Any, config: Any) -> str:
    from dstp.policies import registered

    if any(policy is p for p in registered()):
        archs = ", ".join(policy.architectures) or config.model_type
        return f"explicit policy {policy.name!r}, registered for {archs}: {policy.doc}"
    return f"no explicit policy for {config.model_type!r}; {policy.name!r} {policy.doc}"


def sharded_shapes(config: Any, policy: Any, tp: int, rank: int) -> list[tuple[str, str, tuple]]:
    """(module, layer type, local weight shape) of every module the policy replaces."""
    from dstp.model.inject import swap_modules

    model = meta_model(config)
    heads = policy.validate(config, tp)
    swap_modules(model, policy, heads, virtual_tp(rank, tp), torch.float32)
    rows = []
    for name, module in model.named_modules():
        from dstp.policies import Experts

        style = policy.style_for(name)
        if name in (policy.embedding, policy.lm_head) or (
            style is not None and not isinstance(style, Experts)
        ):
            rows.append((name, type(module).__name__, tuple(module.weight.shape)))
        elif isinstance(style, Experts):
            for attr in (style.gate_up, style.down):
                rows.append((f"{name}.{attr}", "experts (3D)", tuple(getattr(module, attr).shape)))
    return rows


def first_block_only(rows: list[tuple[str, str, tuple]]) -> list[tuple[str, str, tuple]]:
    """Rows outside the decoder blocks plus those of block 0 (the others repeat it)."""
    return [r for r in rows if not re.search(r"\.\d+\.", r[0]) or re.search(r"\.0\.", r[0])]


def report(config: Any, tp: int, dtype: str) -> tuple[str, bool]:
    """The inspection text and whether ``tp`` is valid."""
    from dstp.policies import policy_for

    policy = policy_for(config)
    lines = [
        f"model: {', '.join(config.architectures or [config.model_type])}",
        f"policy: {policy_origin(policy, config)}",
    ]
    problems = policy.problems(config, tp)
    if problems:
        lines.append(f"TP={tp} is invalid: " + "; ".join(problems))
        lines.append(f"valid TP sizes: {policy.valid_tp_sizes(config)}")
        return "\n".join(lines), False
    heads = policy.head_layout(config, tp)
    lines.append(
        f"heads per rank: {heads.local_heads}/{heads.num_heads} query, {heads.local_kv_heads}/"
        f"{heads.num_kv_heads} KV (each KV head on {heads.kv_replicas} rank(s)), head_dim {heads.head_dim}"
    )
    rows = sharded_shapes(config, policy, tp, rank=0)
    blocks = len({m.group(1) for r in rows if (m := re.search(r"\.(\d+)\.", r[0]))})
    lines.append(f"per-rank shapes (every rank holds the same shapes; block 0 of {blocks} shown):")
    width = max(len(r[0]) for r in rows)
    for name, kind, shape in first_block_only(rows):
        lines.append(f"  {name:<{width}}  {kind:<24} {tuple(shape)}")
    model = meta_model(config)
    full = parameter_bytes_per_rank(model, policy, config, 1, DTYPE_BYTES[dtype])
    local = parameter_bytes_per_rank(model, policy, config, tp, DTYPE_BYTES[dtype])
    lines.append(
        f"parameter bytes per rank ({dtype}): {local:,} ({local / GIB:.3f} GiB) of {full:,} "
        f"for the whole model ({local / full:.1%})"
    )
    return "\n".join(lines), True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or config.json")
    parser.add_argument("--tp", type=int, required=True, help="tensor-parallel size to inspect")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")


def main(args: argparse.Namespace) -> int:
    text, valid = report(load_config(args.model), args.tp, args.dtype)
    print(text)
    return 0 if valid else 1
