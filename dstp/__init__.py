"""dstp: tensor-parallel serving of Hugging Face causal LMs on DeepSpeed.

``model = dstp.load(path)`` inside ``deepspeed --num_gpus N script.py`` gives
every rank the same HF model with its parallelisable modules replaced by
tensor-parallel ones holding only that rank's shard.
"""

from __future__ import annotations

import torch

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def load(
    path: str,
    dtype: torch.dtype = torch.float32,
    *,
    attn_implementation: str = "sdpa",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """Load the HF checkpoint at ``path`` sharded over the launcher's ranks.

    Returns the HF ``PreTrainedModel``: ``model(input_ids).logits`` holds the
    full-vocabulary logits on every rank and ``model.generate`` works. The TP
    size is the world size the launcher started (1 for a plain script).
    """
    from dstp.distributed import init_tp
    from dstp.model.inject import shard_model

    tp = init_tp()
    sharded = shard_model(
        path,
        tp,
        dtype,
        attn_implementation=attn_implementation,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    model = sharded.model
    model.dstp = sharded  # policy, head layout and sizes, for tools that want them
    return model
