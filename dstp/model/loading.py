"""Checkpoint access that reads only this rank's bytes.

``Checkpoint`` maps tensor names to lazy handles: indexing a
:class:`LazyTensor` (``handle[a:b]``, ``handle[:, a:b]``) reads just those
bytes with ``pread`` into a fresh tensor. Nothing is memory-mapped, so the
page cache that the reads fill is never counted in (or charged to) a rank's
resident memory, and a column slice (a row-parallel weight) streams through a
small bounce buffer instead of touching the whole tensor's pages. Slices the
fast path does not cover (steps, N-D column slices, exotic dtypes) go through
safetensors' own ``get_slice``. When pickles are explicitly allowed, handles
are memory-mapped tensors from ``torch.load(weights_only=True)``.
Headers and the index are checked up front, so a missing or corrupt file is
reported before any weight is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from dstp.cpu import libc

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
BOUNCE_BYTES = 16 << 20  # rows read at once when casting or filling a strided destination
STAGING_BYTES = 64 << 20  # each of the two host buffers a device-bound read goes through
FORCE_HOST_STAGING = False  # tests: take the device path (staging buffers) on CPU too
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(RuntimeError):
    """The checkpoint folder cannot be read; the message says what to do."""


class LazyTensor:
    """One safetensors tensor, read on indexing (``pread`` of just the sliced bytes)."""

    def __init__(
        self, file: Path, name: str, shape: tuple[int, ...], dtype: str = "", offset: int = -1
    ) -> None:
        self.file = file
        self.name = name
        self.shape = shape
        self.dtype = _DTYPES.get(dtype)  # None: read through safetensors
        self.offset = offset  # of the first byte in the file

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, key: Any) -> Any:
        bounds = self._bounds(key)
        if bounds is None:
            return self._read_with_safetensors(key)
        out = torch.empty([b - a for a, b in bounds], dtype=self.dtype)
        self._read_into(out, bounds)
        return out

    def read_into(self, dest: torch.Tensor, key: Any) -> None:
        """``dest.copy_(self[key])`` without the intermediate tensor (dtype cast included)."""
        bounds = self._bounds(key)
        if bounds is None or tuple(dest.shape) != tuple(b - a for a, b in bounds):
            dest.copy_(self[key])
        elif dest.device.type != "cpu" or FORCE_HOST_STAGING:
            _staging().read(self, dest, bounds)
        else:
            self._read_into(dest, bounds)

    def _read_with_safetensors(self, key: Any) -> torch.Tensor:
        try:
            with safe_open(str(self.file), framework="pt") as handle:
                return handle.get_slice(self.name)[key]
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {self.name!r} from {self.file}: {exc}") from exc

    def _bounds(self, key: Any) -> list[tuple[int, int]] | None:
        """(start, stop) per dimension for a key of plain slices the fast path reads, else None."""
        if self.dtype is None or self.offset < 0:
            return None
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > len(self.shape) or not all(isinstance(k, slice) for k in key):
            return None
        bounds = []
        for dim, size in enumerate(self.shape):
            part = key[dim] if dim < len(key) else slice(None)
            start, stop, step = part.indices(size)
            if step != 1:
                return None
            bounds.append((start, max(start, stop)))
        inner_sliced = any(b != (0, n) for b, n in zip(bounds[1:], self.shape[1:], strict=True))
        if inner_sliced and len(self.shape) != 2:
            return None
        return bounds

    def _read_into(self, dest: torch.Tensor, bounds: list[tuple[int, int]]) -> None:
        """Fill ``dest`` (the sliced shape): one pread when it can, else rows via a bounce buffer."""
        if dest.numel() == 0:
            return
        row_elems = math.prod(self.shape[1:])
        row_bytes = row_elems * self.dtype.itemsize
        first_row, rows = (bounds[0][0], bounds[0][1] - bounds[0][0]) if bounds else (0, 1)
        columns = slice(*bounds[1]) if len(bounds) == 2 else slice(None)
        whole_rows = columns == slice(None) or bounds[1] == (0, self.shape[1])
        try:
            fd = os.open(self.file, os.O_RDONLY)
            try:
                start = self.offset + first_row * row_bytes
                if dest.dtype == self.dtype and dest.is_contiguous():
                    if whole_rows:
                        _pread_exact(fd, dest, start)
                    else:
                        skip = bounds[1][0] * self.dtype.itemsize
                        _pread_columns(fd, dest, start + skip, row_bytes)
                    return
                # A column slice, a cast or a strided destination: stream whole rows.
                target = dest.unsqueeze(0) if dest.dim() == 0 else dest
                per_read = max(1, BOUNCE_BYTES // row_bytes)
                bounce = torch.empty(min(per_read, rows), row_elems, dtype=self.dtype)
                for r in range(0, rows, per_read):
                    n = min(per_read, rows - r)
                    _pread_exact(fd, bounce[:n], self.offset + (first_row + r) * row_bytes)
                    part = target[r : r + n]
                    part.copy_(bounce[:n, columns].reshape(part.shape))
            finally:
                os.close(fd)
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.name!r} from {self.file}: {exc}") from exc


class HostStaging:
    """Two reusable host buffers that a device-bound read lands in, then one async copy each.

    A device tensor cannot be ``pread`` into, and pageable host memory makes
    every copy synchronous: reads go into a pinned buffer (on CUDA) and
    ``copy_(non_blocking=True)`` to the device while the next read fills the
    other buffer. A buffer is refilled only once the copy that read it is done,
    so host memory per rank stays at the two buffers, whatever the model size.
    """

    def __init__(self, nbytes: int = STAGING_BYTES) -> None:
        self.nbytes = nbytes
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._copied: list[Any] = [None, None]  # CUDA event of each buffer's last copy
        self._turn = 0

    def read(self, handle: LazyTensor, dest: torch.Tensor, bounds: list[tuple[int, int]]) -> None:
        """Fill ``dest`` (any device) with ``handle``'s ``bounds``, a block of rows at a time."""
        if dest.numel() == 0:
            return
        if not bounds:  # a 0-d tensor
            self._stage(handle, dest, [])
            return
        first, stop = bounds[0]
        slice_row = math.prod(b - a for a, b in bounds[1:]) * handle.dtype.itemsize
        per_chunk = max(1, self.nbytes // max(1, slice_row))
        for row in range(first, stop, per_chunk):
            rows = (row, min(stop, row + per_chunk))
            part = dest[row - first : rows[1] - first]
            self._stage(handle, part, [rows, *bounds[1:]])

    def _stage(self, handle: LazyTensor, dest: torch.Tensor, bounds: list[tuple[int, int]]) -> None:
        nbytes = dest.numel() * handle.dtype.itemsize
        host = self._buffer(dest, nbytes)[:nbytes].view(handle.dtype).view(dest.shape)
        handle._read_into(host, bounds)
        dest.copy_(host, non_blocking=host.is_pinned())
        if dest.is_cuda:
            event = torch.cuda.Event()
            event.record()
            self._copied[self._turn] = event
        self._turn ^= 1

    def _buffer(self, dest: torch.Tensor, nbytes: int) -> torch.Tensor:
        copied = self._copied[self._turn]
        if copied is not None:
            copied.synchronize()  # the copy that last read this buffer has finished
            self._copied[self._turn] = None
        buffer = self._buffers[self._turn]
        if buffer is None or buffer.numel() < nbytes:
            size = max(nbytes, self.nbytes)
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=dest.is_cuda)
            self._buffers[self._turn] = buffer
        return buffer

    def finish(self) -> None:
        """Wait for the last copies and free the buffers (the end of a load)."""
        for event in self._copied:
            if event is not None:
                event.synchronize()
        self._buffers, self._copied = [None, None], [None, None]


_STAGING: HostStaging | None = None


def _staging() -> HostStaging:
    global _STAGING
    if _STAGING is None:
        _STAGING = HostStaging()
    return _STAGING


def finish_staged_reads() -> None:
    """Complete every staged copy to the device and release the host buffers."""
    global _STAGING
    if _STAGING is not None:
        _STAGING.finish()
        _STAGING = None


def _pread_exact(fd: int, dest: torch.Tensor, offset: int) -> None:
    """Fill the contiguous tensor ``dest`` with the file's bytes from ``offset``."""
    view = memoryview(dest.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += got


def _pread_columns(fd: int, dest: torch.Tensor, offset: int, row_bytes: int) -> None:
    """Scatter-read one column range of consecutive rows into the rows of ``dest``.

    The file range from the first row's columns to the last row's is read in
    one ``preadv`` per batch of rows: each row's columns land in ``dest``,
    the bytes between them in one small scratch buffer, so no bounce copy of
    whole rows is ever allocated.
    """
    rows = dest.shape[0]
    view = memoryview(dest.view(-1).view(torch.uint8).numpy())
    width = len(view) // rows
    gap = memoryview(bytearray(row_bytes - width))
    per_call = max(1, _IOV_MAX // 2)
    for first in range(0, rows, per_call):
        last = min(rows, first + per_call)
        buffers = []
        for r in range(first, last):
            buffers.append(view[r * width : (r + 1) * width])
            if r + 1 < last:
                buffers.append(gap)
        expected = (last - first) * row_bytes - len(gap)
        if os.preadv(fd, buffers, offset + first * row_bytes) != expected:
            for r in range(first, last):  # a short read: finish row by row
                _pread_exact(fd, dest[r], offset + r * row_bytes)


def _safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, byte ranges)."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header["__data_start__"] = 8 + length
    return header


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them after big frees).

    Loading allocates and frees one slice per tensor; without this, glibc's
    arenas can keep tens of MB of them resident for the process's lifetime.
    """
    trim = libc.function("malloc_trim")
    if trim is not None:  # glibc's
        trim(0)


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
            header = _safetensors_header(file)
        except (SafetensorError, OSError, ValueError, struct.error) as exc:
            raise CheckpointError(
                f"{file} is not a readable safetensors file ({exc}). "
                "The file is truncated or corrupt: re-download or re-save it."
            ) from exc
        for key, shape in shapes.items():
            entry = header.get(key)
            offset = header["__data_start__"] + entry["data_offsets"][0] if entry else -1
            dtype = entry["dtype"] if entry else ""
            self._tensors[key] = LazyTensor(file, key, shape, dtype, offset)
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
        for name in pickles:
            state = torch.load(self.path / name, map_location="cpu", mmap=True, weights_only=True)
            for key, tensor in state.items():
                self._tensors[key] = tensor
                self.files_by_tensor[key] = name

    # -- access ----------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.files_by_tensor

    def get(self, name: str) -> Any:
        """A lazy handle for ``name``: index it to read (``h[a:b]``, ``h[:]``)."""
        if name not in self._tensors:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.path}")
        return self._tensors[name]

    def nbytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in set(self.files_by_tensor.values()))


def load_config(path: str, trust_remote_code: bool = False) -> Any:
    """The HF config of a checkpoint folder (or hub id), or of a bare config.json file.

    A config.json path lets ``dstp plan`` / ``dstp inspect`` work before any
    weights are downloaded.
    """
    from transformers import AutoConfig  # heavy: only when a config is read

    file = Path(path)
    if file.is_file():
        config_dict = json.loads(file.read_text())
        return AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
