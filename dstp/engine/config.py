"""The engine's settings: one dataclass that the CLI, the engine and the model runner share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# vLLM's spellings: "half" and "float" too; "auto" is the checkpoint's own dtype.
DTYPE_ALIASES = {"half": "float16", "float": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPE_CHOICES = ["auto", "half", "float16", "bfloat16", "float", "float32"]


def checkpoint_dtype(model: str | Path) -> str:
    """The dtype a checkpoint folder's config.json declares (``dtype``, or the older
    ``torch_dtype``), as a :data:`DTYPES` key; float32 when it declares none (as
    transformers and vLLM assume), or one dstp does not serve in."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    declared = config.get("dtype") or config.get("torch_dtype") or "float32"
    if not isinstance(declared, str):
        return "float32"
    declared = declared.removeprefix("torch.")
    declared = DTYPE_ALIASES.get(declared, declared)
    return declared if declared in DTYPES else "float32"


def resolve_dtype(dtype: str, model: str | Path, device_type: str = "cpu") -> str:
    """``--dtype`` as a :data:`DTYPES` key: aliases mapped, "auto" read from the checkpoint.

    On CUDA, "auto" serves a float32 checkpoint (or one that declares no dtype) in
    bfloat16 (float16 on GPUs without bf16), as vLLM does: half the memory of float32,
    and SDPA's flash kernel, which float32 never reaches. ``--dtype float32`` keeps float32.
    """
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype == "auto":
        declared = checkpoint_dtype(model)
        if declared == "float32" and device_type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return declared
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    return dtype


def describe_dtype(dtype: str, model: str | Path, device_type: str = "cpu") -> str:
    """The start-up log's words for ``--dtype``: what it resolved to, and why for "auto"."""
    resolved = resolve_dtype(dtype, model, device_type)
    if DTYPE_ALIASES.get(dtype, dtype) != "auto":
        return f"--dtype {dtype}: {resolved}"
    declared = checkpoint_dtype(model)
    if declared != resolved:
        return (
            f"--dtype auto: {resolved} on {device_type} (the checkpoint is {declared}; "
            f"GPUs serve it in 16 bits, as vLLM does; --dtype {declared} keeps it)"
        )
    return f"--dtype auto: {resolved} (the checkpoint's)"


@dataclass
class EngineConfig:
    model: str
    dtype: str = "bfloat16"  # or "auto", "half", "float" (see resolve_dtype)
    cpu_compute_dtype: str = "auto"  # multi-row bf16 linears on CPU (see dstp.cpu.gemm)
    kv_cache_memory_gib: float | None = None  # per rank; None: sized from the device (kv_budget.py)
    gpu_memory_utilization: float = 0.9  # CUDA: share of device memory dstp may use in all
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    allow_pickle: bool = False
    trust_remote_code: bool = False
    fused_layers: bool = True  # the policy's fused decoder layers (dstp.model.fused_layers)
    model_name: str | None = None  # name shown to clients; defaults to the path
    num_blocks: int | None = None  # exact KV blocks per rank, overriding the memory budget
    # ranks per replica; None: the whole world (one replica). See dstp.replicas.
    tensor_parallel_size: int | None = None
    # decode-only steps at padded batch buckets over preallocated inputs (fixed shapes,
    # dstp.worker.decode_buckets); compile_decode ("inductor", "aot_eager", "eager") also
    # runs each bucket's forward under torch.compile(fullgraph=True, dynamic=False);
    # cuda_graphs captures each bucket's forward as a CUDA graph (dstp.worker.cuda_graphs):
    # None (the default) where graphs run (CUDA, TP=1), True also warns where they do not,
    # False never (--enforce-eager)
    bucket_decode: bool = False
    compile_decode: str | None = None
    cuda_graphs: bool | None = None

    @property
    def fixed_shape_decode(self) -> bool:
        """Decode-only steps run at padded buckets, asked for by any of the three options
        (graphs left to their default pad them too, where they run: the model runner's
        call)."""
        return self.bucket_decode or self.cuda_graphs is True or self.compile_decode is not None

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch dtype ("auto": the checkpoint's, "half" / "float": vLLM's)."""
        return DTYPES[resolve_dtype(self.dtype, self.model)]

    def dtype_on(self, device: torch.device) -> torch.dtype:
        """The dtype weights and KV cache take on ``device`` (see :func:`resolve_dtype`)."""
        return DTYPES[resolve_dtype(self.dtype, self.model, device.type)]


ALLOW_LONG_ENV = "DSTP_ALLOW_LONG_MAX_MODEL_LEN"  # vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN


def context_length(requested: int | None, trained: int | None) -> int:
    """The context a model is served with: ``max_model_len`` if given, else its trained
    ``max_position_embeddings``. Past the trained context is refused (outputs there may be
    wrong, as vLLM refuses) unless ``DSTP_ALLOW_LONG_MAX_MODEL_LEN=1`` says otherwise."""
    import logging
    import os

    trained = trained or 2**31
    if requested is None or requested <= trained:
        return requested or trained
    if os.environ.get(ALLOW_LONG_ENV, "0") in ("", "0"):
        raise ValueError(
            f"--max-model-len {requested} exceeds the model's max_position_embeddings "
            f"{trained} (config.json): pass --max-model-len {trained} or less, or leave "
            f"it out; to serve longer anyway, set {ALLOW_LONG_ENV}=1"
        )
    logging.getLogger("dstp").warning(
        "--max-model-len %d exceeds the model's max_position_embeddings %d (allowed by %s): "
        "outputs past the trained context may be wrong",
        requested, trained, ALLOW_LONG_ENV,
    )  # fmt: skip
    return requested
