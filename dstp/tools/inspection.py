"""``dstp inspect``: what dstp would do to a model at a TP size, without reading weights.

Shows the policy in use and why (from ``--policy``, registered for the
architecture, or derived and from what), the head layout per rank, every split
module of each distinct decoder block (blocks with the same per-rank shapes are
grouped, so dense and MoE layers both show) with its per-rank shape, the parameter
bytes each rank holds, and, when the TP size is invalid, why and which sizes are
valid. A derived policy is first proven against HF on a shrunk copy of the model at
that TP size (``dstp.model.policy_proof``): the ``proof:`` line, or one line naming the
layer that differs and exit status 2. Without a policy it prints one line saying what
to do.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import torch

from dstp.model.loading import load_config
from dstp.model.meta_model import meta_model
from dstp.tools.planner import (
    DTYPE_BYTES,
    GIB,
    kv_bytes_per_token,
    parameter_bytes_per_rank,
    v_head_dim,
)


def virtual_tp(rank: int, size: int) -> Any:
    """A TP group that only knows its place: enough to build shards on the meta device."""
    from dstp.distributed import TPGroup

    return TPGroup(rank, size, rank, size, torch.device("meta"), None, False)


def policy_origin(policy: Any, config: Any) -> str:
    from dstp.model.policy_source import describe

    return describe(policy, config)


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


_BLOCK = re.compile(r"^(.*?\.)(\d+)(\..*)$")  # prefix, block index, name inside the block


def block_groups(rows: list[tuple[str, str, tuple]]) -> list[tuple[list[int], list[tuple]]]:
    """Decoder blocks grouped by identical per-rank rows (name inside the block, type, shape):
    [(block indices, rows of the group's first block)], in order of first block."""
    by_block: dict[int, list[tuple]] = {}
    for row in rows:
        if m := _BLOCK.match(row[0]):
            by_block.setdefault(int(m.group(2)), []).append((m.group(3), *row[1:]))
    groups: dict[tuple, list[int]] = {}
    for index in sorted(by_block):
        groups.setdefault(tuple(by_block[index]), []).append(index)
    first = {min(blocks): blocks for blocks in groups.values()}
    return [
        (blocks, [r for r in rows if (m := _BLOCK.match(r[0])) and int(m.group(2)) == start])
        for start, blocks in sorted(first.items())
    ]


def block_ranges(blocks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans: list[list[int]] = []
    for b in blocks:
        if spans and b == spans[-1][1] + 1:
            spans[-1][1] = b
        else:
            spans.append([b, b])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def report(config: Any, tp: int, dtype: str) -> tuple[str, bool]:
    """The inspection text and whether ``tp`` is valid."""
    from dstp.model.inject import check_attention_backend
    from dstp.model.policy_proof import is_derived, prove_policy
    from dstp.policies import policy_for

    check_attention_backend(config, "sdpa")  # ALiBi: no path can shard it, said first
    policy = policy_for(config)
    lines = [
        f"model: {', '.join(config.architectures or [config.model_type])}",
        f"policy: {policy_origin(policy, config)}",
        f"engine: {engine_verdict(config)}",
        f"decoder layers: {_fused_form(policy)}",
    ]
    problems = policy.problems(config, tp)
    if problems:
        lines.append(f"TP={tp} is invalid: " + "; ".join(problems))
        lines.append(f"valid TP sizes: {policy.valid_tp_sizes(config)}")
        return "\n".join(lines), False
    if is_derived(policy):
        proof = prove_policy(config, policy, tp)  # a PolicyProofFailed names the layer
        lines.append(
            f"proof: the derived policy equals HF at TP={tp} on a shrunk copy of the model "
            f"({proof.shrunk}; seeded weights): {proof.compared} module outputs and the "
            f"logits (max |dlogit| {proof.max_logit_error:.1e})"
        )
    heads = policy.head_layout(config, tp)
    v_dim = v_head_dim(policy, config, heads.head_dim)
    sizes = (
        f"head_dim {heads.head_dim}"
        if v_dim == heads.head_dim
        else f"head sizes K {heads.head_dim}, V {v_dim} (config.{policy.v_head_dim_attr})"
    )
    lines.append(
        f"heads per rank: {heads.local_heads}/{heads.num_heads} query, {heads.local_kv_heads}/"
        f"{heads.num_kv_heads} KV (each KV head on {heads.kv_replicas} rank(s)), {sizes}"
    )
    rows = sharded_shapes(config, policy, tp, rank=0)
    groups = block_groups(rows)
    total = sum(len(blocks) for blocks, _ in groups)
    lines.append(
        f"per-rank shapes (every rank holds the same shapes; {total} blocks in "
        f"{len(groups)} distinct group(s), the first block of each shown):"
    )
    width = max(len(r[0]) for r in rows)

    def show(shown: list[tuple]) -> None:
        for name, kind, shape in shown:
            lines.append(f"  {name:<{width}}  {kind:<24} {tuple(shape)}")

    show([r for r in rows if not _BLOCK.match(r[0]) and r[0] != policy.lm_head])
    for blocks, shown in groups:
        word = "block" if len(blocks) == 1 else "blocks"
        lines.append(f" {word} {block_ranges(blocks)} ({len(blocks)} of {total}):")
        show(shown)
    show([r for r in rows if not _BLOCK.match(r[0]) and r[0] == policy.lm_head])
    model = meta_model(config)
    full = parameter_bytes_per_rank(model, policy, config, 1, DTYPE_BYTES[dtype])
    local = parameter_bytes_per_rank(model, policy, config, tp, DTYPE_BYTES[dtype])
    lines.append(
        f"parameter bytes per rank ({dtype}): {local:,} ({local / GIB:.3f} GiB) of {full:,} "
        f"for the whole model ({local / full:.1%})"
    )
    per_token = kv_bytes_per_token(config, heads, DTYPE_BYTES[dtype], v_dim)
    layers = config.get_text_config().num_hidden_layers
    lines.append(
        f"KV cache bytes per token per rank ({dtype}): {per_token:,} ({layers} layers x "
        f"{heads.local_kv_heads} KV heads x (K {heads.head_dim} + V {v_dim}) x "
        f"{DTYPE_BYTES[dtype]} bytes)"
    )
    return "\n".join(lines), True


def _fused_form(policy: Any) -> str:
    """What runs each decoder layer after loading (dstp.model.fused_layers)."""
    if policy.fused_layer is None:
        return "Hugging Face's own"
    return (
        f"dstp's fused {policy.fused_layer!r} form where each proves equal to HF's at load "
        "(--no-fused-layers: HF's own)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or config.json")
    parser.add_argument("--tp", type=int, required=True, help="tensor-parallel size to inspect")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    parser.add_argument(
        "--policy",
        metavar="FILE_OR_MODULE",
        help="inspect with your own policy: a .py file or a module's dotted name that calls "
        "dstp.policies.register(policy) on import (as dstp serve --policy)",
    )


def engine_verdict(config: Any) -> str:
    """Whether the engine (``dstp serve``) can page this model's attention, or why not."""
    from dstp.model.inject import PAGED_ATTENTION, check_attention_backend
    from dstp.policies import TPConfigError

    try:
        check_attention_backend(config, PAGED_ATTENTION)
    except TPConfigError as exc:
        return f"cannot serve it: {exc}"
    return (
        "attention goes through AttentionInterface; at start-up every rank also runs a "
        "prefill and 2 decode steps through the paged KV cache before /health is 200"
    )


class InspectError(Exception):
    """What ``dstp inspect`` cannot do, as the one line it prints."""


def main(args: argparse.Namespace) -> int:
    from dstp.model.policy_source import PolicySourceError, chosen_policy, import_policies
    from dstp.policies import TPConfigError

    try:
        config = _config(args.model)
        if args.policy:
            chosen_policy(config, import_policies(args.policy), args.policy)
        text, valid = report(config, args.tp, args.dtype)
    except (InspectError, PolicySourceError) as exc:
        print(f"dstp inspect: {exc}", file=sys.stderr)
        return 2
    except TPConfigError as exc:  # no policy, or one that does not fit the model
        text = " ".join(str(exc).split()).rstrip(".")
        hint = "" if args.policy else "; or pass your own with --policy FILE"
        print(f"dstp inspect: {text}{hint}", file=sys.stderr)
        return 2
    print(text)
    return 0 if valid else 1


def _config(model: str) -> Any:
    try:
        return load_config(model)
    except (OSError, ValueError, KeyError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), repr(exc))
        raise InspectError(
            f"cannot read the config of {model}: {first.strip()} (a checkpoint folder or its "
            "config.json, of an architecture the installed transformers knows)"
        ) from None
