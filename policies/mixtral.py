"""Mixtral: Llama attention plus a sparse MoE block of fused experts.

In transformers 5 the experts are one module holding 3D ``gate_up_proj``
``(experts, 2 * inner, hidden)`` and ``down_proj`` ``(experts, hidden,
inner)``; checkpoints keep Mixtral's per-expert ``w1``/``w3``/``w2`` under
``block_sparse_moe``. Each rank holds every expert's slice of the inner
dimension (w1/w3 column, w2 row); the router (``mlp.gate``) stays replicated,
so every rank routes every token the same way.
"""

from .base import Experts
from .llama import LLAMA_ATTENTION, llama_like

MIXTRAL = llama_like(
    "mixtral",
    "MixtralForCausalLM",
    "mixtral",
    "Mixtral: Llama attention; experts' w1/w3 column, w2 row, router replicated.",
    layers={
        **LLAMA_ATTENTION,
        "model.layers.*.mlp.experts": Experts(
            unfused={
                "gate_up_proj": ("{e}.w1.weight", "{e}.w3.weight"),
                "down_proj": ("{e}.w2.weight",),
            }
        ),
    },
    checkpoint_renames=((r"\.mlp\.", ".block_sparse_moe."),),
)
