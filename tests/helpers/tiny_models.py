"""Tiny random Hugging Face checkpoints for tests (generated, never downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dstp.model.default_model import STORIES as BUILTIN_STORIES

# stories260K (real weights) as the package ships it: tests never depend on ../shared.
STORIES = BUILTIN_STORIES.locate()

# name -> LlamaConfig overrides; together they cover MHA, GQA, GQA with KV
# replication at TP=4, a vocabulary no TP size divides, tied and untied
# embeddings, attention and MLP biases, and a sharded (indexed) checkpoint.
LLAMA_VARIANTS: dict[str, dict[str, Any]] = {
    "mha_bias_oddvocab": dict(
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=251,
        attention_bias=True,
        tie_word_embeddings=False,
    ),
    "gqa_tied": dict(
        num_attention_heads=8, num_key_value_heads=4, vocab_size=256, tie_word_embeddings=True
    ),
    "gqa_kv2_replicated": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=203,
        tie_word_embeddings=False,
        mlp_bias=True,
    ),
    "gqa_sharded_ckpt": dict(
        num_attention_heads=4, num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True
    ),
}


def stories_decode_heavy(**overrides: Any):
    """stories260K at 512 tokens with 64 sequences and 32-token steps: on a small (fake)
    card the batched decode's gather is the budget's largest worst-step term."""
    from dstp.engine.llm_engine import EngineConfig

    settings = dict(max_model_len=512, max_num_seqs=64, max_num_batched_tokens=32)
    return EngineConfig(model=str(STORIES), dtype="float32", **{**settings, **overrides})


def llama_config(**overrides: Any):
    from transformers import LlamaConfig

    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    base.update(overrides)
    return LlamaConfig(**base)


def save_random_model(
    config: Any,
    path: Path,
    seed: int = 0,
    max_shard_size: str | None = None,
    *,
    as_modules: bool = False,
) -> Path:
    """Random weights (std 0.2 so logits are not all alike) saved with save_pretrained.

    ``save_pretrained`` writes fused MoE experts one tensor per expert (as the
    hub's originals store them); ``as_modules=True`` writes the model's own
    parameter names instead (fused 3D experts), one file, tied weights once.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    if as_modules:
        path.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.contiguous() for n, p in model.named_parameters()}  # tied: once
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(path)
        model.generation_config.save_pretrained(path)
        return path
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def build_variants(root: Path) -> dict[str, Path]:
    paths = {}
    for i, (name, overrides) in enumerate(LLAMA_VARIANTS.items()):
        shard = "40KB" if "sharded" in name else None
        paths[name] = save_random_model(
            llama_config(**overrides), root / name, seed=i, max_shard_size=shard
        )
    return paths
