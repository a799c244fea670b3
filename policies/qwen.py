"""Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm).

Qwen2's q/k/v biases split with their weights' output rows (the column layer
slices bias and weight alike). Qwen3's ``q_norm``/``k_norm`` normalise each
head over ``head_dim``: a rank holds whole heads, so the norms stay replicated.
"""

from .llama import llama_like

QWEN2 = llama_like(
    "qwen2",
    "Qwen2ForCausalLM",
    "qwen2",
    doc="Qwen2: as Llama; q/k/v biases split with their heads.",
    fused_layer="llama",
)

QWEN3 = llama_like(
    "qwen3",
    "Qwen3ForCausalLM",
    "qwen3",
    doc="Qwen3: as Llama; per-head q/k norms act on head_dim and stay replicated.",
    fused_layer="llama",
)
