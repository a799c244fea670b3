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


def resolve_dtype(dtype: str, model: str | Path) -> str:
    """``--dtype`` as a :data:`DTYPES` key: aliases mapped, "auto" read from the checkpoint."""
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype == "auto":
        return checkpoint_dtype(model)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    return dtype


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
    model_name: str | None = None  # name shown to clients; defaults to the path
    num_blocks: int | None = None  # exact KV blocks per rank, overriding the memory budget
    # ranks per replica; None: the whole world (one replica). See dstp.replicas.
    tensor_parallel_size: int | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch dtype ("auto": the checkpoint's, "half" / "float": vLLM's)."""
        return DTYPES[resolve_dtype(self.dtype, self.model)]


# -- server-wide sampling defaults (--generation-config, --seed) ------------------------
# generation_config.json keys that set a request's default, as vLLM reads them.
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(folder: str | Path) -> dict[str, object]:
    """The sampling defaults a folder's ``generation_config.json`` sets explicitly (only the
    keys it names: transformers' implicit defaults such as top_k=50 do not count, as in
    vLLM). Values a request could not carry either are dropped with a warning."""
    import logging

    from dstp.engine.sampling_params import InvalidRequest, SamplingParams

    file = Path(folder) / "generation_config.json"
    try:
        config = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError) as exc:
        logging.getLogger("dstp").warning("ignoring %s: %s", file, exc)
        return {}
    found = {k: config[k] for k in GENERATION_CONFIG_KEYS if config.get(k) is not None}
    if found.get("top_k") == 0:
        found["top_k"] = -1  # HF's "off"
    for key in list(found):
        try:
            SamplingParams(**{key: found[key]})
        except (InvalidRequest, TypeError) as exc:
            logging.getLogger("dstp").warning("ignoring %s's %s: %s", file, key, exc)
            del found[key]
    return found


class SamplingDefaults:
    """What a request that leaves a sampling field out gets: the generation config's value,
    and (with ``--seed``) a seed drawn from one generator seeded once, as vLLM seeds its
    global generator: a server run answers the same sequence of requests the same way,
    while two requests still draw different samples."""

    def __init__(self, fields: dict[str, object] | None = None, seed: int | None = None) -> None:
        import threading

        self._lock = threading.Lock()
        self.configure(fields, seed)

    def configure(self, fields: dict[str, object] | None = None, seed: int | None = None) -> None:
        import random

        self.fields = dict(fields or {})
        self.seed = seed
        self._seeds = random.Random(seed) if seed is not None else None

    def fill(self, given: dict[str, object]) -> dict[str, object]:
        """``given`` (the request's own fields) completed with these defaults."""
        out = {**self.fields, **given}
        if self._seeds is not None and out.get("seed") is None:
            with self._lock:
                out["seed"] = self._seeds.getrandbits(63)
        return out


# The HTTP server's defaults (protocol reads them for every request): none until the
# server's start-up configures them.
SAMPLING_DEFAULTS = SamplingDefaults()
