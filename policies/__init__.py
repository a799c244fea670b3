"""Injection policies, one file per family, and the registry that picks one.

Installed as ``dstp.policies``. To support a new architecture, write a
:class:`Policy` (see docs/writing-a-policy.md) and :func:`register` it.
"""

from __future__ import annotations

from typing import Any

from .auto import derive_policy
from .base import Col, Experts, HeadLayout, LogitOp, Policy, Row, ShardedNorm, TPConfigError
from .deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from .deepspeed_compat import from_injection_policy, to_injection_policy
from .gemma import GEMMA, GEMMA2
from .gpt2 import GPT2
from .gpt_neox import GPT_NEOX
from .llama import LLAMA
from .mistral import MISTRAL
from .mixtral import MIXTRAL
from .olmo2 import OLMO2
from .opt import OPT
from .phi3 import PHI3
from .qwen import QWEN2, QWEN3
from .qwen_moe import QWEN2_MOE, QWEN3_MOE

__all__ = [
    "Col",
    "Experts",
    "HeadLayout",
    "LogitOp",
    "Policy",
    "Row",
    "ShardedNorm",
    "TPConfigError",
    "derive_policy",
    "from_injection_policy",
    "to_injection_policy",
    "policy_for",
    "register",
    "registered",
]

_REGISTRY: list[Policy] = []


def register(policy: Policy) -> Policy:
    """Add ``policy`` to the registry; later registrations win over earlier ones."""
    _REGISTRY.insert(0, policy)
    return policy


def registered() -> list[Policy]:
    return list(_REGISTRY)


def policy_for(config: Any) -> Policy:
    """The policy for a HF config: registered (by ``architectures``, then ``model_type``),
    else one derived from the config's TP plan or module graph (see auto.py)."""
    architectures = list(getattr(config, "architectures", None) or [])
    for arch in architectures:
        for policy in _REGISTRY:
            if arch in policy.architectures:
                return policy
    model_type = getattr(config, "model_type", None)
    for policy in _REGISTRY:
        if model_type in policy.model_types:
            return policy
    try:
        return derive_policy(config)
    except (TPConfigError, ValueError, KeyError, AttributeError) as exc:
        reason = str(exc)
    known = sorted({a for p in _REGISTRY for a in p.architectures})
    raise TPConfigError(
        f"no injection policy for architecture {architectures or '?'} (model_type={model_type!r}), "
        f"and none could be derived: {reason}. Known: {known}. Write one in a few lines: "
        "see docs/writing-a-policy.md, then dstp.policies.register(policy)."
    )


for _policy in (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, PHI3, GPT_NEOX, GPT2, OPT, MIXTRAL):
    register(_policy)
for _policy in (QWEN2_MOE, QWEN3_MOE, OLMO2, DEEPSEEK_V2, DEEPSEEK_V3):
    register(_policy)
