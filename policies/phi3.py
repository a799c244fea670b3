"""Phi-3: fused ``qkv_proj`` (q heads, then k, then v) and fused ``gate_up_proj``.

Each rank takes its slice of every component, so its local ``qkv_proj``
output is ``[q_local | k_local | v_local]`` and its ``gate_up_proj`` output
``[gate_local | up_local]``: the model's own ``chunk``/slicing works on them
once the attention module sees local head counts. Phi-3's attention slices
with ``self.config.num_attention_heads``, hence ``attention_config``.
"""

from .base import Col, Policy, Row

PHI3 = Policy(
    name="phi3",
    architectures=("Phi3ForCausalLM",),
    model_types=("phi3",),
    layers={
        "model.layers.*.self_attn.qkv_proj": Col(("q", "kv", "kv")),
        "model.layers.*.self_attn.o_proj": Row(("q",)),
        "model.layers.*.mlp.gate_up_proj": Col(("even", "even")),
        "model.layers.*.mlp.down_proj": Row(),
    },
    embedding="model.embed_tokens",
    lm_head="lm_head",
    attention="model.layers.*.self_attn",
    attention_attrs={
        "num_key_value_groups": "kv_groups",
        "num_key_value_heads": "local_kv_heads",
    },
    attention_config={"num_attention_heads": "local_heads"},
    doc="Phi-3: fused qkv = (q, kv, kv) and gate_up = (even, even), each component split.",
)
