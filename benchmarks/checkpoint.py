"""Random-weight Llama checkpoints for benchmarks, written straight to safetensors.

Why not ``AutoModelForCausalLM.from_config(...).save_pretrained``: that
initialises the whole model in fp32 (~5 GB for 1.24B parameters) and runs HF's
slow init. Here each tensor is drawn in its final dtype and streamed into one
``model.safetensors`` file (the format is an 8-byte header length, a JSON
header, then raw bytes), so peak memory is one tensor (the 525 MB embedding)
and a 2.47 GB checkpoint takes seconds. The folder is built under a temporary
name and renamed when complete, so a cached checkpoint is never half-written.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class LlamaShape:
    """The config fields that decide tensor shapes (and hence bytes read per step)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# Llama-3.2-1B's shape (random weights): the model the issues' figures refer to.
LLAMA_1B = LlamaShape(2048, 16, 32, 8, 8192, 128256)
# ~30M parameters: the same structure (GQA, tied), small enough for quick checks.
SMALL = LlamaShape(512, 4, 8, 4, 1536, 32000)


def tensor_specs(shape: LlamaShape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, named as HF's LlamaForCausalLM names them."""
    h, kv = shape.hidden_size, shape.num_key_value_heads * shape.head_dim
    yield "model.embed_tokens.weight", (shape.vocab_size, h)
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (shape.intermediate_size, h)
        yield p + "mlp.up_proj.weight", (shape.intermediate_size, h)
        yield p + "mlp.down_proj.weight", (h, shape.intermediate_size)
    yield "model.norm.weight", (h,)
    if not shape.tie_word_embeddings:
        yield "lm_head.weight", (shape.vocab_size, h)


def hf_config(shape: LlamaShape, dtype: torch.dtype):
    from transformers import LlamaConfig

    fields = asdict(shape)
    return LlamaConfig(
        **fields,
        head_dim=shape.head_dim,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=1,
        eos_token_id=2,
        dtype=str(dtype).removeprefix("torch."),
        architectures=["LlamaForCausalLM"],
    )


def _random(name: str, size: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator):
    if name.endswith("norm.weight"):
        return torch.ones(size, dtype=dtype)
    # std 0.02 (HF's initializer_range); drawn in the target dtype, no fp32 copy
    return torch.empty(size, dtype=dtype).normal_(0.0, 0.02, generator=gen)


def write_safetensors(
    path: Path, specs: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, seed: int
) -> int:
    """Stream random tensors into one safetensors file; returns its size in bytes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}  # type: ignore[dict-item]
    offset = 0
    for name, size in specs:
        nbytes = itemsize * int(torch.Size(size).numel())
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(size),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data must start 8-byte aligned
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, size in specs:
            tensor = _random(name, size, dtype, gen)
            f.write(tensor.view(torch.uint8).numpy().tobytes())
            del tensor
    return path.stat().st_size


def ensure_checkpoint(
    root: Path, shape: LlamaShape, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> Path:
    """The cached checkpoint folder for ``shape`` under ``root``, generating it once."""
    tag = "x".join(
        str(v)
        for v in (
            shape.hidden_size,
            shape.num_hidden_layers,
            shape.num_attention_heads,
            shape.num_key_value_heads,
            shape.intermediate_size,
            shape.vocab_size,
        )
    )
    name = f"llama-{tag}-{'tied' if shape.tie_word_embeddings else 'untied'}-{DTYPE_NAMES[dtype].lower()}-s{seed}"
    final = root / name
    if (final / "model.safetensors").exists() and (final / "config.json").exists():
        return final
    tmp = root / (name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf_config(shape, dtype).save_pretrained(tmp)
    write_safetensors(tmp / "model.safetensors", list(tensor_specs(shape)), dtype, seed)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def weight_bytes(path: Path) -> dict[str, int]:
    """Bytes of the checkpoint's tensors, split into what one decode step reads.

    A batch-1 decode step reads every matrix once (the tied embedding as the
    LM head) but only one row of the embedding lookup; norms are negligible.
    """
    from safetensors import safe_open

    total = per_step = body_params = lm_head_params = 0
    config = json.loads((path / "config.json").read_text())
    tied = config.get("tie_word_embeddings", False)
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                sl = f.get_slice(key)
                shape = sl.get_shape()
                n = int(torch.Size(shape).numel())
                nbytes = n * {"BF16": 2, "F16": 2, "F32": 4}[sl.get_dtype()]
                total += nbytes
                embedding = key.endswith("embed_tokens.weight")
                if embedding and not tied:
                    continue  # lookup only; the separate lm_head is counted
                per_step += nbytes
                if embedding or key.endswith("lm_head.weight"):
                    lm_head_params += n
                elif len(shape) == 2:
                    body_params += n
    return {
        "tensor_bytes": total,
        "decode_bytes_per_step": per_step,
        # multiply-adds per token: the layers' matrices, and the LM head (last token only
        # in a prefill)
        "body_params": body_params,
        "lm_head_params": lm_head_params,
    }
