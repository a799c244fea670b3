"""Gemma and Gemma 2: Llama's module names, a scaled embedding, tied LM head.

The embedding multiplies its output by sqrt(hidden) (``scalar_embed_scale``);
the parallel embedding keeps that scale. Gemma 2's attention and final-logit
soft-capping act on per-head scores and on full gathered logits, so they need
no splitting; transformers computes attention soft-capping only in its eager
path, so Gemma 2 asks for it. The final soft-capping is a ``logits`` step:
dstp calls the LM head itself.
"""

from .base import LogitOp
from .llama import llama_like

GEMMA = llama_like(
    "gemma",
    "GemmaForCausalLM",
    "gemma",
    doc="Gemma: as Llama, scaled embedding tied to the LM head.",
    embedding_scale="scalar_embed_scale",
)

GEMMA2 = llama_like(
    "gemma2",
    "Gemma2ForCausalLM",
    "gemma2",
    doc="Gemma 2: as Gemma; soft-capping works on per-head scores and gathered logits.",
    embedding_scale="scalar_embed_scale",
    attn_implementation="eager",
    logits=(LogitOp("softcap", "final_logit_softcapping"),),
)
