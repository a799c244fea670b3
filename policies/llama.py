"""Llama and the families that share its module names (Mistral, Qwen2, ...)."""

from dataclasses import replace
from typing import Any

from .base import Col, Policy, Row

# Llama's attention rules, shared by families that only change the MLP (Mixtral)
LLAMA_ATTENTION = {
    "model.layers.*.self_attn.q_proj": Col(("q",)),
    "model.layers.*.self_attn.k_proj": Col(("kv",)),
    "model.layers.*.self_attn.v_proj": Col(("kv",)),
    "model.layers.*.self_attn.o_proj": Row(("q",)),
}

LLAMA = Policy(
    name="llama",
    architectures=("LlamaForCausalLM",),
    model_types=("llama",),
    layers={
        **LLAMA_ATTENTION,
        "model.layers.*.mlp.gate_proj": Col(),
        "model.layers.*.mlp.up_proj": Col(),
        "model.layers.*.mlp.down_proj": Row(),
    },
    embedding="model.embed_tokens",
    lm_head="lm_head",
    attention="model.layers.*.self_attn",
    # HF repeats each local KV head this many times; under KV replication it
    # is local query heads (not the full model's heads / kv heads).
    attention_attrs={"num_key_value_groups": "kv_groups"},
    fused_layer="llama",
    doc="Llama 1/2/3: q/k/v and gate/up column-parallel, o/down row-parallel.",
)


def llama_like(name: str, architecture: str, model_type: str, doc: str, **changes: Any) -> Policy:
    """A policy for a family that keeps Llama's module names (Mistral, Qwen, Gemma...).

    Llama's fused layer is not inherited (Gemma's norms, OLMo2's post-norms and the MoE
    families' MLPs are other forms): a family that has Llama's layer passes
    ``fused_layer="llama"``.
    """
    changes.setdefault("fused_layer", None)
    return replace(
        LLAMA,
        name=name,
        architectures=(architecture,),
        model_types=(model_type,),
        doc=doc,
        **changes,
    )
