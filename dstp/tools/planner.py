"""``dstp plan``: which TP size to run, from config.json and the device memory alone.

For every TP size the policy accepts, it computes the parameter bytes one rank
holds (from the policy's split of each module of a meta-device model, so
replicated norms, padded vocabulary and replicated KV heads count), the
KV-cache bytes per token per rank, and how many tokens of KV cache fit in
what is left. The recommendation is the smallest TP size whose weights fit
with room for a useful KV cache (``--batch`` sequences of ``--context``
tokens), preferring sizes inside one NVLink domain (8 devices).

With ``--devices N`` it also lays the N devices out as data-parallel replicas
(``dstp serve --tensor-parallel-size T`` on N ranks gives N / T replicas): the
smallest fitting T that divides N (and, when it can, the devices of one node), so
as many replicas as possible run side by side, each with its own batch and no
all-reduce between them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any

from dstp.model.loading import load_config
from dstp.model.meta_model import meta_model

GIB = 2**30
NVLINK_DOMAIN = 8
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# rough per-device all-reduce bus bandwidth (bytes/s) and per-call latency (s)
INTERCONNECTS = {"nvlink": (150e9, 10e-6), "pcie": (20e9, 30e-6)}


@dataclass(frozen=True)
class TPOption:
    """The memory picture of one TP size."""

    tp: int
    weight_bytes: int  # per rank
    kv_bytes_per_token: int  # per rank
    kv_budget_bytes: int  # per rank, after weights and the reserve
    kv_tokens: int
    allreduce_ms_per_token: float  # decode, batch 1, estimated
    fits_weights: bool
    fits_kv: bool


@dataclass(frozen=True)
class Plan:
    policy: str
    dtype: str
    device_memory_gib: float
    usable_bytes: int
    target_kv_tokens: int
    options: list[TPOption]
    invalid: dict[int, list[str]]
    recommended: int | None
    reason: str
    devices: int | None = None  # --devices: the launcher's world
    replicas: int | None = None  # devices // recommended, when it divides
    replica_reason: str = ""
    k_head_dim: int | None = None  # per head, as the KV cache holds it
    v_head_dim: int | None = None  # differs from K's under MLA (policy.v_head_dim_attr)
    v_head_dim_attr: str | None = None


def parameter_bytes_per_rank(
    model: Any, policy: Any, config: Any, tp: int, dtype_bytes: int
) -> int:
    """Bytes of parameters rank 0 holds at ``tp`` (every rank holds the same amount)."""
    from dstp.model.layers import partition_for
    from dstp.policies import Col, Experts, Row
    from dstp.policies.base import require_linear_shape

    heads = policy.head_layout(config, tp)
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    vocab_modules = {policy.embedding, None if tied else policy.lm_head} - {None}
    skip = {f"{policy.lm_head}.weight"} if tied and policy.lm_head else set()
    total = 0
    for name, module in model.named_modules():
        style = policy.style_for(name)
        own = {n: p for n, p in module.named_parameters(recurse=False) if f"{name}.{n}" not in skip}
        if name in vocab_modules:
            per_rank = -(-module.weight.shape[0] // tp)
            total += sum(
                per_rank * p[0].numel() if p.dim() == 2 else per_rank for p in own.values()
            )
        elif isinstance(style, Experts):
            for attr, p in own.items():
                split_dim, parts = (
                    (1, style.gate_up_parts) if attr == style.gate_up else (2, ("even",))
                )
                local = partition_for(parts, p.shape[split_dim], heads, 0, tp).local_size
                total += p.numel() // p.shape[split_dim] * local
        elif isinstance(style, Col | Row):
            in_f, out_f, _, has_bias = require_linear_shape(module)
            split = out_f if isinstance(style, Col) else in_f
            local = partition_for(style.parts, split, heads, 0, tp).local_size
            weight = (local * in_f) if isinstance(style, Col) else (out_f * local)
            total += weight + (0 if not has_bias else local if isinstance(style, Col) else out_f)
        else:
            total += sum(p.numel() for p in own.values())
    return total * dtype_bytes


def v_head_dim(policy: Any, config: Any, k_head_dim: int) -> int:
    """V's head size: the config attribute the policy names in ``v_head_dim_attr`` (MLA's
    ``v_head_dim``), else K's; the paged cache sizes V the same way
    (``dstp.worker.kv_cache.v_head_dim``)."""
    from dstp.worker.kv_cache import v_head_dim as cache_v_head_dim

    return cache_v_head_dim(policy, config, k_head_dim)


def kv_bytes_per_token(
    config: Any, heads: Any, dtype_bytes: int, v_head_dim: int | None = None
) -> int:
    """K and V of one token for every layer, in the KV heads one rank holds; V at
    ``v_head_dim`` where it differs from K's ``heads.head_dim`` (MLA)."""
    layers = config.get_text_config().num_hidden_layers
    v = heads.head_dim if v_head_dim is None else v_head_dim
    return layers * heads.local_kv_heads * (heads.head_dim + v) * dtype_bytes


def allreduce_ms(config: Any, policy: Any, tp: int, dtype_bytes: int, interconnect: str) -> float:
    """Estimated all-reduce time of one decode token (two per block, ring algorithm)."""
    if tp == 1:
        return 0.0
    bandwidth, latency = INTERCONNECTS[interconnect]
    text = config.get_text_config()
    message = text.hidden_size * dtype_bytes
    per_call = 2 * (tp - 1) / tp * message / bandwidth + latency
    return 2 * text.num_hidden_layers * per_call * 1e3


def make_plan(
    config: Any,
    device_memory_gib: float,
    *,
    interconnect: str = "nvlink",
    dtype: str | None = None,
    utilization: float = 0.9,
    batch: int = 32,
    context: int | None = None,
    max_tp: int = 64,
    devices: int | None = None,
    devices_per_node: int = NVLINK_DOMAIN,
) -> Plan:
    """The memory picture of every valid TP size and the recommended one."""
    from dstp.policies import policy_for

    dtype = dtype or _config_dtype(config)
    dtype_bytes = DTYPE_BYTES[dtype]
    policy = policy_for(config)
    model = meta_model(config)
    usable = int(device_memory_gib * GIB * utilization)
    context = context or min(
        getattr(config.get_text_config(), "max_position_embeddings", 4096) or 4096, 4096
    )
    target = batch * context
    options, invalid = [], {}
    for tp in (n for n in range(1, max_tp + 1) if n & (n - 1) == 0 or n % 8 == 0):
        problems = policy.problems(config, tp)
        if problems:
            invalid[tp] = problems
        else:
            options.append(
                _option(config, policy, model, tp, dtype_bytes, usable, target, interconnect)
            )
    full_heads = policy.head_layout(config, 1)
    v_dim = v_head_dim(policy, config, full_heads.head_dim)
    recommended, reason = _recommend(options, target, interconnect)
    replicas, replica_reason = None, ""
    if devices is not None:
        recommended, replicas, replica_reason = _lay_out(
            options, recommended, devices, devices_per_node
        )
    return Plan(
        policy.name,
        dtype,
        device_memory_gib,
        usable,
        target,
        options,
        invalid,
        recommended,
        reason,
        devices,
        replicas,
        replica_reason,
        k_head_dim=full_heads.head_dim,
        v_head_dim=v_dim,
        v_head_dim_attr=policy.v_head_dim_attr,
    )


def _option(
    config: Any,
    policy: Any,
    model: Any,
    tp: int,
    dtype_bytes: int,
    usable: int,
    target: int,
    interconnect: str,
) -> TPOption:
    """One TP size's memory picture: weights, KV room and all-reduce cost per token."""
    weights = parameter_bytes_per_rank(model, policy, config, tp, dtype_bytes)
    heads = policy.head_layout(config, tp)
    per_token = kv_bytes_per_token(
        config, heads, dtype_bytes, v_head_dim(policy, config, heads.head_dim)
    )
    budget = max(0, usable - weights)
    tokens = budget // per_token
    return TPOption(
        tp,
        weights,
        per_token,
        budget,
        tokens,
        allreduce_ms(config, policy, tp, dtype_bytes, interconnect),
        weights <= usable,
        tokens >= target,
    )


def _lay_out(
    options: list[TPOption], smallest: int | None, devices: int, per_node: int
) -> tuple[int | None, int | None, str]:
    """(T, replicas, why) for ``devices``: the smallest fitting T >= ``smallest`` that
    divides ``devices``, preferring one that also divides the devices of a node."""
    if smallest is None:
        return None, None, ""
    fitting = [
        o.tp
        for o in options
        if o.fits_weights and o.fits_kv and o.tp >= smallest and devices % o.tp == 0
    ]
    if not fitting:
        return (
            None,
            None,
            (
                f"no fitting TP size (TP >= {smallest}) divides {devices} devices: "
                f"use a multiple of {smallest} devices"
            ),
        )
    in_node = [t for t in fitting if per_node % t == 0 or t % per_node == 0]
    tp = (in_node or fitting)[0]
    replicas = devices // tp
    why = (
        f"{replicas} replica(s) of TP={tp}: each replica serves its own batch and pays no "
        "all-reduce to the others, so the smallest TP that fits gives the most throughput"
    )
    if tp != smallest:
        why += f" (TP={smallest} fits but does not divide {devices} devices evenly)"
    if replicas > 1 and tp > 1:
        why += f"; each TP group is {tp} consecutive ranks"
        why += ", inside one node" if per_node % tp == 0 else ", spanning nodes"
    return tp, replicas, why


def _recommend(options: list[TPOption], target: int, interconnect: str) -> tuple[int | None, str]:
    fitting = [o for o in options if o.fits_weights and o.fits_kv]
    if not fitting:
        weights_only = [o.tp for o in options if o.fits_weights]
        return None, (
            f"no TP size up to {options[-1].tp if options else '?'} leaves room for {target} KV tokens"
            + (f" (weights alone fit at TP={weights_only[0]})" if weights_only else "")
            + ": use more or larger devices, or a smaller dtype"
        )
    inside = [o for o in fitting if o.tp <= NVLINK_DOMAIN]
    best = (inside or fitting)[0]
    smaller = [o for o in options if o.tp < best.tp]
    why = f"smallest TP whose weights fit with room for {target} KV tokens ({best.kv_tokens} fit)"
    if smaller:
        last = smaller[-1]
        why += f"; TP={last.tp} " + (
            "leaves KV room for only " + f"{last.kv_tokens} tokens"
            if last.fits_weights
            else "cannot hold the weights"
        )
    if not inside:
        why += f"; needs more than one {interconnect} domain of {NVLINK_DOMAIN} devices"
    elif interconnect == "pcie" and best.tp > 2:
        why += "; over PCIe every all-reduce is slow: expect weaker scaling than NVLink"
    return best.tp, why


def _config_dtype(config: Any) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).replace("torch.", "") if dtype else "bfloat16"
    return name if name in DTYPE_BYTES else "bfloat16"


def format_plan(plan: Plan) -> str:
    lines = [
        f"policy {plan.policy}, {plan.dtype}, {plan.device_memory_gib:g} GiB devices "
        f"({plan.usable_bytes / GIB:.1f} GiB usable), KV target {plan.target_kv_tokens} tokens",
    ]
    if plan.v_head_dim is not None and plan.v_head_dim != plan.k_head_dim:
        lines.append(
            f"K and V heads differ: K {plan.k_head_dim}, V {plan.v_head_dim} per head "
            f"(config.{plan.v_head_dim_attr}); KV/token counts both"
        )
    lines += [
        f"{'TP':>4} {'weights/rank':>13} {'KV room/rank':>13} {'KV/token/rank':>14} "
        f"{'KV tokens':>11} {'all-reduce/tok':>15}  verdict",
    ]
    for o in plan.options:
        verdict = (
            "fits"
            if o.fits_weights and o.fits_kv
            else "KV too small"
            if o.fits_weights
            else "weights do not fit"
        )
        lines.append(
            f"{o.tp:>4} {o.weight_bytes / GIB:>9.2f} GiB {o.kv_budget_bytes / GIB:>9.2f} GiB "
            f"{o.kv_bytes_per_token / 1024:>10.1f} KiB {o.kv_tokens:>11} {o.allreduce_ms_per_token:>12.3f} ms  {verdict}"
        )
    for tp, problems in sorted(plan.invalid.items()):
        if tp <= 16:
            lines.append(f"{tp:>4} invalid: {'; '.join(problems)}")
    if plan.recommended and plan.devices is not None:
        lines.append(
            f"recommended for {plan.devices} devices: TP={plan.recommended} x "
            f"{plan.replicas} replica(s) ({plan.replica_reason}); memory: {plan.reason}"
        )
        lines.append(
            f"  deepspeed --num_gpus {plan.devices} launch/serve.py --model MODEL "
            f"--tensor-parallel-size {plan.recommended}"
        )
    elif plan.devices is not None and plan.replica_reason:
        lines.append(f"no layout for {plan.devices} devices: {plan.replica_reason}")
    elif plan.recommended:
        lines.append(f"recommended: TP={plan.recommended} ({plan.reason})")
    else:
        lines.append(f"no recommendation: {plan.reason}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or config.json")
    parser.add_argument("--device-memory", type=float, required=True, metavar="GiB")
    parser.add_argument("--interconnect", choices=sorted(INTERCONNECTS), default="nvlink")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=None)
    parser.add_argument(
        "--utilization", type=float, default=0.9, help="share of device memory to use"
    )
    parser.add_argument("--batch", type=int, default=32, help="sequences the KV cache should hold")
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        help="tokens per sequence (default: min(max positions, 4096))",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="devices to serve on: also recommends how many data-parallel replicas of "
        "which TP size (the flags for dstp serve)",
    )
    parser.add_argument(
        "--devices-per-node",
        type=int,
        default=NVLINK_DOMAIN,
        help="devices per node: a TP group should stay inside one (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(args: argparse.Namespace) -> int:
    config = load_config(args.model)
    plan = make_plan(
        config,
        args.device_memory,
        interconnect=args.interconnect,
        dtype=args.dtype,
        utilization=args.utilization,
        batch=args.batch,
        context=args.context,
        devices=args.devices,
        devices_per_node=args.devices_per_node,
    )
    print(json.dumps(asdict(plan), indent=2) if args.json else format_plan(plan))
    return 0 if plan.recommended else 1
