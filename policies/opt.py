"""OPT: separate q/k/v/out projections, fc1/fc2 directly in the decoder layer.

The attention module reshapes with ``self.num_heads``, which becomes local.
Learned positions and the optional project_in/out stay replicated.
"""

from .base import Col, Policy, Row

OPT = Policy(
    name="opt",
    architectures=("OPTForCausalLM",),
    model_types=("opt",),
    layers={
        "model.decoder.layers.*.self_attn.q_proj": Col(("q",)),
        "model.decoder.layers.*.self_attn.k_proj": Col(("kv",)),
        "model.decoder.layers.*.self_attn.v_proj": Col(("kv",)),
        "model.decoder.layers.*.self_attn.out_proj": Row(("q",)),
        "model.decoder.layers.*.fc1": Col(),
        "model.decoder.layers.*.fc2": Row(),
    },
    embedding="model.decoder.embed_tokens",
    lm_head="lm_head",
    attention="model.decoder.layers.*.self_attn",
    attention_attrs={"num_heads": "local_heads"},
    kv_heads_attr=None,
    head_dim_attr=None,
    divisible=("ffn_dim",),
    doc="OPT: q/k/v and fc1 column, out_proj and fc2 row; positions replicated.",
)
