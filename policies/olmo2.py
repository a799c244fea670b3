"""OLMo2: Llama's module names, with q/k norms over the whole attention width.

``q_norm`` normalises the full ``q_proj`` output (``heads * head_dim``) and
``k_norm`` the full ``k_proj`` output, before the heads are split: a rank
holds only its heads' slice of each, so the norms are :class:`ShardedNorm`
(weight cut like the projection, one all-reduce of the per-token sums of
squares), not replicated as Qwen3's per-head norms are. OLMo2 multiplies by
the weight in fp32 and then casts, ``ShardedNorm``'s default.
"""

from .base import ShardedNorm
from .llama import LLAMA, llama_like

OLMO2 = llama_like(
    "olmo2",
    "Olmo2ForCausalLM",
    "olmo2",
    "OLMo2: as Llama; q/k norms over the full attention width, sharded with their "
    "projections and completed by one all-reduce of the sums of squares each.",
    layers={
        **LLAMA.layers,
        "model.layers.*.self_attn.q_norm": ShardedNorm(("q",)),
        "model.layers.*.self_attn.k_norm": ShardedNorm(("kv",)),
    },
)
