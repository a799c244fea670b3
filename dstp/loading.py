"""Checkpoint access that reads only this rank's bytes.

``Checkpoint`` maps tensor names to lazy handles: indexing a
:class:`LazyTensor` (``handle[a:b]``, ``handle[:, a:b]``) reads just those
bytes, mapping the file only for that read, so pages touched for one slice
(a row-parallel slice touches every page of its tensor) leave this process's
memory right after. When pickles are explicitly allowed, handles are
memory-mapped tensors from ``torch.load(weights_only=True)``.
Headers and the index are checked up front, so a missing or corrupt file is
reported before any weight is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


class CheckpointError(RuntimeError):
    """The checkpoint folder cannot be read; the message says what to do."""


class LazyTensor:
    """One safetensors tensor, read on indexing; the file is mapped only during the read."""

    def __init__(self, file: Path, name: str, shape: tuple[int, ...]) -> None:
        self.file = file
        self.name = name
        self.shape = shape

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, key: Any) -> Any:
        try:
            with safe_open(str(self.file), framework="pt") as handle:
                return handle.get_slice(self.name)[key]
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {self.name!r} from {self.file}: {exc}") from exc


class Checkpoint:
    """The tensors of one HF checkpoint folder, opened lazily."""

    def __init__(self, path: str | Path, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self._tensors: dict[str, Any] = {}  # name -> LazyTensor (or mmapped tensor for pickles)
        self.files_by_tensor: dict[str, str] = {}
        if not self.path.is_dir():
            raise CheckpointError(f"model path {str(self.path)!r} is not a directory")
        files = self._safetensors_files()
        if files:
            for name in files:
                self._open_safetensors(name)
        else:
            self._open_pickles(allow_pickle)

    # -- discovery -----------------------------------------------------------
    def _safetensors_files(self) -> list[str]:
        index = self.path / SAFETENSORS_INDEX
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
            missing = sorted({f for f in weight_map.values() if not (self.path / f).exists()})
            if missing:
                raise CheckpointError(
                    f"{index.name} lists shard file(s) missing from {self.path}: {missing}. "
                    "Re-download or copy the complete checkpoint."
                )
            self._expected = weight_map
            return sorted(set(weight_map.values()))
        self._expected = {}
        return sorted(p.name for p in self.path.glob("*.safetensors"))

    def _open_safetensors(self, name: str) -> None:
        file = self.path / name
        try:
            with safe_open(str(file), framework="pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{file} is not a readable safetensors file ({exc}). "
                "The file is truncated or corrupt: re-download or re-save it."
            ) from exc
        for key, shape in shapes.items():
            self._tensors[key] = LazyTensor(file, key, shape)
            self.files_by_tensor[key] = name
        for key, file in self._expected.items():
            if file == name and key not in self.files_by_tensor:
                raise CheckpointError(f"{name} lacks tensor {key!r} that the index promises")

    def _open_pickles(self, allow_pickle: bool) -> None:
        pickles = sorted({p.name for pat in PICKLE_PATTERNS for p in self.path.glob(pat)})
        if not pickles:
            raise CheckpointError(
                f"no *.safetensors files in {self.path}. Save the model with "
                "model.save_pretrained(path) (safetensors is the default)."
            )
        if not allow_pickle:
            raise CheckpointError(
                f"{self.path} holds only pickle checkpoints ({', '.join(pickles)}). dstp does not "
                "unpickle by default (pickles can execute code). Convert once with "
                '`python -c "from transformers import AutoModelForCausalLM as M; '
                f"M.from_pretrained('{self.path}').save_pretrained('{self.path}')\"`, "
                "or pass --allow-pickle / allow_pickle=True to load tensors with "
                "torch.load(weights_only=True)."
            )
        import torch

        for name in pickles:
            state = torch.load(self.path / name, map_location="cpu", mmap=True, weights_only=True)
            for key, tensor in state.items():
                self._tensors[key] = tensor
                self.files_by_tensor[key] = name

    # -- access ----------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.files_by_tensor

    def names(self) -> Iterator[str]:
        return iter(self.files_by_tensor)

    def get(self, name: str) -> Any:
        """A lazy handle for ``name``: index it to read (``h[a:b]``, ``h[:]``)."""
        if name not in self._tensors:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.path}")
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self.get(name)
        return tuple(handle.shape) if hasattr(handle, "shape") else tuple(handle.get_shape())

    def nbytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in set(self.files_by_tensor.values()))
