"""Injection policies, one file per family, and the registry that picks one.

Installed as ``dstp.policies``. To support a new architecture, write a
:class:`Policy` (see docs/writing-a-policy.md) and :func:`register` it.
"""

from __future__ import annotations

from typing import Any

from .base import Col, HeadLayout, Policy, Row, TPConfigError
from .llama import LLAMA

__all__ = [
    "Col",
    "HeadLayout",
    "Policy",
    "Row",
    "TPConfigError",
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
    """The policy for a HF config, by ``architectures`` first, then ``model_type``."""
    architectures = list(getattr(config, "architectures", None) or [])
    for arch in architectures:
        for policy in _REGISTRY:
            if arch in policy.architectures:
                return policy
    model_type = getattr(config, "model_type", None)
    for policy in _REGISTRY:
        if model_type in policy.model_types:
            return policy
    known = sorted({a for p in _REGISTRY for a in p.architectures})
    raise TPConfigError(
        f"no injection policy for architecture {architectures or '?'} (model_type={model_type!r}). "
        f"Known: {known}. Write one in a few lines: see docs/writing-a-policy.md, "
        "then dstp.policies.register(policy)."
    )


register(LLAMA)
