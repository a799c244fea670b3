"""Tiny random checkpoints of every architecture dstp has a policy for (and two it derives).

Each config keeps 4 query heads (TP = 2 and 4 both valid) and, where the
architecture has GQA, 2 KV heads (so TP=4 replicates each KV head on two
ranks), an MLP width divisible by 4 and a vocabulary no TP size divides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.helpers.tiny_models import save_random_model

COMMON = dict(vocab_size=250, bos_token_id=1, eos_token_id=2, pad_token_id=None)
LLAMA_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    **COMMON,
)

MOE_SHAPE = dict(
    LLAMA_SHAPE,
    num_hidden_layers=3,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    tie_word_embeddings=False,
)
QWEN2_MOE_SHAPE = dict(MOE_SHAPE, shared_expert_intermediate_size=48)
QWEN3_MOE_SHAPE = dict(MOE_SHAPE, head_dim=16)
# DeepSeek-V2: MLA with K heads (qk_nope 16 + rope 8 = 24) wider than V heads (16), one
# dense layer then MoE (4 routed experts, top-2, one shared expert)
DEEPSEEK_V2_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=128,
    kv_lora_rank=32,
    q_lora_rank=None,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    tie_word_embeddings=False,
    **COMMON,
)
# architectures saved with their fused parameters as the model names them
# (save_pretrained writes MoE experts one tensor per expert)
FUSED_CHECKPOINTS = {"qwen2_moe_fused", "qwen3_moe_fused", "deepseek_v2_q_lora_fused"}

# name -> (config class name, overrides)
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "mistral": ("MistralConfig", dict(LLAMA_SHAPE, sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(LLAMA_SHAPE, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(LLAMA_SHAPE, head_dim=16, tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", dict(LLAMA_SHAPE, head_dim=16)),
    "gemma2": (
        "Gemma2Config",
        dict(
            LLAMA_SHAPE,
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "phi3": ("Phi3Config", dict(LLAMA_SHAPE, original_max_position_embeddings=128)),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            **COMMON,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, **COMMON),
    ),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=128,
            **COMMON,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(LLAMA_SHAPE, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
    ),
    # layer 1 is dense (mlp_only_layers) beside MoE layers 0 and 2
    "qwen2_moe": ("Qwen2MoeConfig", dict(QWEN2_MOE_SHAPE, mlp_only_layers=[1])),
    # the same written with fused 3D experts, as the model's own parameter names
    "qwen2_moe_fused": ("Qwen2MoeConfig", dict(QWEN2_MOE_SHAPE, decoder_sparse_step=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(QWEN3_MOE_SHAPE, mlp_only_layers=[1])),
    "qwen3_moe_fused": ("Qwen3MoeConfig", dict(QWEN3_MOE_SHAPE)),
    # q/k norms over the whole attention width (TP=4 also replicates each KV head)
    "olmo2": ("Olmo2Config", dict(LLAMA_SHAPE, tie_word_embeddings=False)),
    # MLA (K and V heads of different sizes) + routed and shared experts; with the q_lora
    # path and group-limited routing, saved with fused experts
    "deepseek_v2": ("DeepseekV2Config", dict(DEEPSEEK_V2_SHAPE)),
    "deepseek_v2_q_lora_fused": (
        "DeepseekV2Config",
        dict(
            DEEPSEEK_V2_SHAPE,
            q_lora_rank=48,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
        ),
    ),
    # DeepSeek-V3: sigmoid routing over 2 expert groups (top group 1), q_lora path
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            DEEPSEEK_V2_SHAPE,
            num_key_value_heads=4,  # its default is the full model's 128 (= its heads)
            q_lora_rank=48,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
    ),
    # no explicit policy: derived from base_model_tp_plan / from the module graph
    # (Granite and Cohere also scale their logits: the derived policy must too)
    "granite": (
        "GraniteConfig",
        dict(
            LLAMA_SHAPE,
            logits_scaling=0.25,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
        ),
    ),
    "cohere": ("CohereConfig", dict(LLAMA_SHAPE, logit_scale=4.0)),
    "starcoder2": (
        "Starcoder2Config",
        dict(LLAMA_SHAPE, intermediate_size=128, use_bias=True),
    ),
    "gpt_neo": (
        "GPTNeoConfig",
        dict(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=8,
            max_position_embeddings=128,
            **COMMON,
        ),
    ),
}


# The launcher tests run every architecture at TP=2 and these also at TP=4: one of each
# way a layout changes from TP=2 to TP=4 (at TP=2 every tiny model holds 2 query heads
# and 1 KV head per rank). With 4 query and 2 KV heads, TP=4 replicates each KV head on
# two ranks: plain k/v projections (Mistral; Starcoder2 with biases, derived), a fused
# q|k|v one (Phi-3), a full-width norm over replicated KV heads (OLMo2). MoE experts cut
# four ways (Mixtral's w1/w3/w2 names, Qwen2-MoE's gated shared expert, Qwen3-MoE fused),
# and MLA with one head per rank (DeepSeek-V2 with and without the q_lora path, V3).
# The rest (MHA models: GPT-NeoX, GPT-2, OPT, GPT-Neo, whose TP=4 split is TP=2's with one
# head per rank; Llama-like models whose attention and policy match Mistral's) gain no
# other path at TP=4.
TP4_ARCHITECTURES = frozenset(
    {
        "mistral",
        "starcoder2",
        "phi3",
        "olmo2",
        "mixtral",
        "qwen2_moe",
        "qwen3_moe_fused",
        "deepseek_v2",
        "deepseek_v2_q_lora_fused",
        "deepseek_v3",
    }
)


def at_tp(names: list[str], tp: int) -> list[str]:
    """``names`` that run at ``tp``: all at TP=2, :data:`TP4_ARCHITECTURES` at TP=4."""
    return [n for n in names if tp != 4 or n in TP4_ARCHITECTURES]


def make_config(name: str) -> Any:
    import transformers

    class_name, overrides = ARCHITECTURES[name]
    return getattr(transformers, class_name)(**overrides)


def selected(names: list[str] | None = None) -> list[str]:
    """``names`` (default: all), narrowed to ``$DSTP_TEST_ARCHS`` (comma-separated) if set.

    The policy tests launch every architecture in one run per TP size; this
    narrows a run to the architectures being worked on.
    """
    names = list(names or ARCHITECTURES)
    only = os.environ.get("DSTP_TEST_ARCHS")
    if not only:
        return names
    wanted = {n.strip() for n in only.split(",") if n.strip()}
    unknown = wanted - set(ARCHITECTURES)
    if unknown:
        raise KeyError(f"DSTP_TEST_ARCHS names unknown architectures: {sorted(unknown)}")
    return [n for n in names if n in wanted]


def build_architectures(root: Path, names: list[str] | None = None) -> dict[str, Path]:
    """Save a random checkpoint for each architecture under ``root``."""
    return {
        name: save_random_model(
            make_config(name), root / name, seed=i, as_modules=name in FUSED_CHECKPOINTS
        )
        for i, name in enumerate(names or ARCHITECTURES)
    }
