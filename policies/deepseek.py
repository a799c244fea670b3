"""DeepSeek-V2 (and V3): multi-head latent attention (MLA) plus routed and shared experts.

MLA as HF computes it (``modeling_deepseek_v2.py``): the query comes from ``q_proj``
or, with ``q_lora_rank``, from ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``; the
keys and values from one shared latent, ``kv_a_proj_with_mqa`` (``kv_lora_rank`` +
the rope key) -> ``kv_a_layernorm`` -> ``kv_b_proj`` (per head: ``qk_nope_head_dim``
key + ``v_head_dim`` value). The latent projections and their norms are small and
stay replicated; ``q_proj``/``q_b_proj`` and ``kv_b_proj`` are column-parallel by
heads (their outputs are head-major, so an even split gives each rank whole heads)
and ``o_proj`` row-parallel. HF expands the shared rope key to every head before
attention, so the paged cache holds ``num_attention_heads`` KV heads whose K
(``qk_nope + qk_rope``) and V (``v_head_dim``) sizes differ: ``v_head_dim_attr``.

Routed experts are transformers 5's fused 3D parameters (:class:`Experts`; a checkpoint
may store them fused or one tensor per expert), the router (``mlp.gate``, with V3's
``e_score_correction_bias``) stays replicated so every rank routes as HF does, and the
shared experts are a dense MLP (gate/up column, down row). The first
``first_k_dense_replace`` layers hold a dense MLP instead: those rules are optional.
"""

from .base import Col, Experts, Policy, Row

ATTN = "model.layers.*.self_attn"
DENSE_MLP = {
    "model.layers.*.mlp.gate_proj": Col(),
    "model.layers.*.mlp.up_proj": Col(),
    "model.layers.*.mlp.down_proj": Row(),
}
Q_PROJ = {f"{ATTN}.q_proj": Col()}  # no q_lora_rank
Q_B_PROJ = {f"{ATTN}.q_b_proj": Col()}  # with q_lora_rank

MLA_LAYERS = {
    **Q_PROJ,
    **Q_B_PROJ,
    f"{ATTN}.kv_b_proj": Col(),
    f"{ATTN}.o_proj": Row(),
    **DENSE_MLP,
    "model.layers.*.mlp.experts": Experts(),
    "model.layers.*.mlp.shared_experts.gate_proj": Col(),
    "model.layers.*.mlp.shared_experts.up_proj": Col(),
    "model.layers.*.mlp.shared_experts.down_proj": Row(),
}


def _deepseek(name: str, architecture: str, model_type: str, doc: str) -> Policy:
    return Policy(
        name=name,
        architectures=(architecture,),
        model_types=(model_type,),
        layers=MLA_LAYERS,
        embedding="model.embed_tokens",
        lm_head="lm_head",
        attention=ATTN,
        attention_attrs={"num_key_value_groups": "kv_groups"},
        optional_layers=(*Q_PROJ, *Q_B_PROJ, *DENSE_MLP),
        head_dim_attr="qk_head_dim",
        v_head_dim_attr="v_head_dim",
        divisible=("intermediate_size", "moe_intermediate_size"),
        doc=doc,
    )


DEEPSEEK_V2 = _deepseek(
    "deepseek_v2",
    "DeepseekV2ForCausalLM",
    "deepseek_v2",
    "DeepSeek-V2: MLA (latent kv_a/q_a projections replicated; q_proj/q_b_proj and "
    "kv_b_proj column by heads, o_proj row; K and V heads of their own sizes); routed "
    "experts' gate/up column, down row, router replicated; shared experts column/row.",
)

DEEPSEEK_V3 = _deepseek(
    "deepseek_v3",
    "DeepseekV3ForCausalLM",
    "deepseek_v3",
    "DeepSeek-V3: DeepSeek-V2's split (MLA, routed and shared experts); the sigmoid router "
    "with its e_score_correction_bias and expert groups stays replicated.",
)
