"""Qwen2-MoE (routed experts plus a gated shared expert) and Qwen3-MoE.

Attention is Llama's (Qwen2-MoE with q/k/v biases, Qwen3-MoE with per-head
q/k norms, which stay replicated). The routed experts are transformers 5's
fused 3D parameters, every expert cut Megatron-style (:class:`Experts`);
checkpoints may store them fused or one tensor per expert
(``experts.{e}.gate_proj/up_proj/down_proj``, as ``save_pretrained`` and the
hub's originals do). The router stays replicated, so every rank routes every
token as HF does.

Qwen2-MoE's shared expert is a dense MLP (gate/up column, down row, so its
output is complete after the row layer's all-reduce); its ``shared_expert_gate``
(hidden -> 1) stays replicated and scales that full output, as in HF.
Layers listed in ``mlp_only_layers`` (or skipped by ``decoder_sparse_step``)
hold a dense MLP instead of the MoE block: those rules are optional.
"""

from .base import Col, Experts, Row
from .llama import LLAMA_ATTENTION, llama_like

DENSE_MLP = {
    "model.layers.*.mlp.gate_proj": Col(),
    "model.layers.*.mlp.up_proj": Col(),
    "model.layers.*.mlp.down_proj": Row(),
}
MOE_WIDTHS = ("intermediate_size", "moe_intermediate_size")

QWEN3_MOE = llama_like(
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    "qwen3_moe",
    "Qwen3-MoE: Qwen3 attention; experts' gate/up column, down row, router replicated.",
    layers={**LLAMA_ATTENTION, **DENSE_MLP, "model.layers.*.mlp.experts": Experts()},
    optional_layers=tuple(DENSE_MLP),
    divisible=MOE_WIDTHS,
)

QWEN2_MOE = llama_like(
    "qwen2_moe",
    "Qwen2MoeForCausalLM",
    "qwen2_moe",
    "Qwen2-MoE: Qwen2 attention; routed experts as Qwen3-MoE; the shared expert a "
    "dense MLP (column/row), its sigmoid gate replicated.",
    layers={
        **LLAMA_ATTENTION,
        **DENSE_MLP,
        "model.layers.*.mlp.experts": Experts(),
        "model.layers.*.mlp.shared_expert.gate_proj": Col(),
        "model.layers.*.mlp.shared_expert.up_proj": Col(),
        "model.layers.*.mlp.shared_expert.down_proj": Row(),
    },
    optional_layers=tuple(DENSE_MLP),
    divisible=(*MOE_WIDTHS, "shared_expert_intermediate_size"),
)
