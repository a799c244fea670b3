"""GPT-2: Conv1D weights stored ``(in, out)`` and a fused ``c_attn`` = [q | k | v].

``transposed=True`` makes the parallel layers read the checkpoint's other
dimension and keep ``nn.Linear`` layout locally. The attention module splits
``c_attn``'s output by ``split_size``, which becomes the local width.
"""

from .base import Col, Policy, Row

GPT2 = Policy(
    name="gpt2",
    architectures=("GPT2LMHeadModel",),
    model_types=("gpt2",),
    layers={
        "transformer.h.*.attn.c_attn": Col(("q", "kv", "kv"), transposed=True),
        "transformer.h.*.attn.c_proj": Row(("q",), transposed=True),
        "transformer.h.*.mlp.c_fc": Col(transposed=True),
        "transformer.h.*.mlp.c_proj": Row(transposed=True),
    },
    embedding="transformer.wte",
    lm_head="lm_head",
    attention="transformer.h.*.attn",
    attention_attrs={"split_size": "local_hidden", "num_heads": "local_heads"},
    kv_heads_attr=None,
    head_dim_attr=None,
    divisible=("n_inner",),
    doc="GPT-2: transposed Conv1D, fused c_attn = (q, kv, kv); learned positions replicated.",
)
