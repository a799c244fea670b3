"""The unmodified HF model built on the meta device: module graph and shapes, no memory.

Its own module so that both the injector (which swaps and materialises the
modules) and the policy derivation in ``dstp.policies.auto`` (which reads the
graph) import it at module top without importing each other. It imports
neither dstp's layers nor its policies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def build_meta_model(config: Any, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` with every parameter on meta, in eval mode.

    Buffers stay real: non-persistent ones (rotary ``inv_freq``) are computed in
    ``__init__`` and are not in checkpoints, so they must survive the meta build.
    """
    from accelerate import init_empty_weights  # heavy: only when a model is built
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    return model.eval()


def meta_model(config: Any) -> nn.Module:
    """The model as shape tools see it (fp32, eager attention: every model has eager)."""
    return build_meta_model(config, torch.float32, "eager")
