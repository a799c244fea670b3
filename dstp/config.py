"""The engine's settings: one dataclass that the CLI, the engine and the model runner share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str
    dtype: str = "bfloat16"
    kv_cache_memory_gib: float | None = None  # per rank; None: sized from the device (kv_budget.py)
    gpu_memory_utilization: float = 0.9  # CUDA: share of device memory dstp may use in all
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    allow_pickle: bool = False
    trust_remote_code: bool = False
    model_name: str | None = None  # name shown to clients; defaults to the path
    num_blocks: int | None = None  # exact KV blocks per rank, overriding the memory budget

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        return DTYPES[self.dtype]
