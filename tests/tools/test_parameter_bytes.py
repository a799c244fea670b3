"""``dstp plan`` / ``dstp inspect`` parameter bytes against accelerate's module sizes.

At TP=1 dstp's per-rank count must be the whole model's, as accelerate counts it. dstp
keeps its own walk on purpose: accelerate knows no TP split, and it counts a tied LM
head's weight a second time (benchmarks/FINDINGS.md).
"""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import compute_module_sizes
from dstp.policies import policy_for
from transformers import AutoConfig

from dstp.model.meta_model import meta_model
from dstp.tools.planner import parameter_bytes_per_rank

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
)


def accelerate_parameter_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    sizes = compute_module_sizes(model, dtype=dtype)
    buffers = compute_module_sizes(model, dtype=dtype, buffers_only=True)
    return sizes[""] - buffers.get("", 0)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("tied", [False, True])
def test_tp1_bytes_are_accelerates(model_type, tied):
    config = AutoConfig.for_model(model_type, tie_word_embeddings=tied, **SMALL)
    model = meta_model(config)
    ours = parameter_bytes_per_rank(model, policy_for(config), config, 1, 2)
    theirs = accelerate_parameter_bytes(model, torch.bfloat16)
    embedding = config.vocab_size * config.hidden_size * 2
    assert ours == theirs - (embedding if tied else 0)


def test_tp_split_shrinks_every_rank():
    config = AutoConfig.for_model("llama", tie_word_embeddings=False, **SMALL)
    model = meta_model(config)
    whole = accelerate_parameter_bytes(model, torch.bfloat16)
    per_rank = parameter_bytes_per_rank(model, policy_for(config), config, 2, 2)
    norms = sum(p.numel() * 2 for n, p in model.named_parameters() if "norm" in n)
    assert per_rank == (whole - norms) // 2 + norms  # norms replicated, the rest split
