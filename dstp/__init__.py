"""dstp: tensor-parallel serving of Hugging Face causal LMs on DeepSpeed.

``model = dstp.load(path)`` inside ``deepspeed --num_gpus N script.py`` gives
every rank the same HF model with its parallelisable modules replaced by
tensor-parallel ones holding only that rank's shard. ``dstp.policies`` (the policy
registry) is imported on first use, so ``import dstp; dstp.policies.register(p)`` works.
"""

from __future__ import annotations

import os

import torch

__version__ = "0.1.0"
__all__ = ["load", "policies", "__version__"]


def __getattr__(name: str):
    """``dstp.policies`` on first use (PEP 562): ``import dstp`` stays light."""
    if name == "policies":
        import importlib

        return importlib.import_module("dstp.policies")  # also binds dstp.policies
    raise AttributeError(f"module 'dstp' has no attribute {name!r}")


def load(
    path: str,
    dtype: torch.dtype = torch.float32,
    *,
    attn_implementation: str = "sdpa",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    policy=None,
    fused_layers: bool = True,
):
    """Load the HF checkpoint at ``path`` sharded over the launcher's ranks.

    Returns the HF ``PreTrainedModel``: ``model(input_ids).logits`` holds the
    full-vocabulary logits on every rank and ``model.generate`` works. The TP
    size is the world size the launcher started (1 for a plain script).

    ``policy``: a :class:`dstp.policies.Policy` to use, or a ``.py`` file / dotted module
    name that registers policies on import (as ``dstp serve --policy``); one of those must
    be the one dstp picks for this model. Default: the registered, else a derived, policy.

    ``fused_layers``: run the policy's fused decoder layer where it proves equal to HF's
    (dstp.model.fused_layers); False keeps HF's layers (``model.dstp.fused_layers`` counts them).
    """
    from dstp.distributed import init_tp
    from dstp.model.inject import shard_model

    if isinstance(policy, str | os.PathLike):
        from dstp.model.loading import load_config
        from dstp.model.policy_source import chosen_policy, import_policies

        value = os.fspath(policy)
        config = load_config(path, trust_remote_code=trust_remote_code)
        policy = chosen_policy(config, import_policies(value, "policy="), value, "policy=")
    tp = init_tp()
    sharded = shard_model(
        path,
        tp,
        dtype,
        attn_implementation=attn_implementation,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        policy=policy,
        fused_layers=fused_layers,
    )
    model = sharded.model
    model.dstp = sharded  # policy, head layout and sizes, for tools that want them
    return model
