"""GPT-NeoX (Pythia): fused ``query_key_value`` interleaved per head.

The fused weight's rows are ``[h0: q k v][h1: q k v]...``: parts ``("q:3",)``
gives each rank whole heads (3 head_dims each), so the model's own
``view(..., -1, 3 * head_size).chunk(3)`` works locally. The attention module
derives everything else from tensor shapes.
"""

from .base import Col, Policy, Row

GPT_NEOX = Policy(
    name="gpt_neox",
    architectures=("GPTNeoXForCausalLM",),
    model_types=("gpt_neox",),
    layers={
        "gpt_neox.layers.*.attention.query_key_value": Col(("q:3",)),
        "gpt_neox.layers.*.attention.dense": Row(("q",)),
        "gpt_neox.layers.*.mlp.dense_h_to_4h": Col(),
        "gpt_neox.layers.*.mlp.dense_4h_to_h": Row(),
    },
    embedding="gpt_neox.embed_in",
    lm_head="lm_head",
    # transformers 5 names the head lm_head; checkpoints keep embed_out
    checkpoint_renames=((r"^lm_head\.", "embed_out."),),
    kv_heads_attr=None,
    head_dim_attr=None,
    doc="GPT-NeoX: per-head interleaved fused QKV (q:3); dense and 4h_to_h row-parallel.",
    fused_layer="gpt_neox",  # parallel residual: one all-reduce per layer
)
