"""The unmodified HF model built on the meta device: module graph and shapes, no memory.

Its own module so that both the injector (which swaps and materialises the
modules) and the policy derivation in ``dstp.policies.auto`` (which reads the
graph) import it at module top without importing each other. It imports
neither dstp's layers nor its policies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


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
    """``AutoModelForCausalLM.from_config`` with every parameter on meta, in eval mode."""
    from transformers import AutoModelForCausalLM  # heavy: only when a model is built

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    return model.eval()


def meta_model(config: Any) -> nn.Module:
    """The model as shape tools see it (fp32, eager attention: every model has eager)."""
    return build_meta_model(config, torch.float32, "eager")
