"""Mistral: Llama's modules and GQA; its sliding window is per-token, not per-head."""

from .llama import llama_like

MISTRAL = llama_like(
    "mistral",
    "MistralForCausalLM",
    "mistral",
    doc="Mistral: as Llama (q/k/v, gate/up column; o, down row); sliding window unaffected.",
    fused_layer="llama",
)
