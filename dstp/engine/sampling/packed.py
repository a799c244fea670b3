"""The sampler's one upload per step: every per-row value in one packed host buffer.

Integers go in as they are, floats as their float64 bits and int32 words (grammar
bitmasks) two to an int64, all into one int64 host buffer (pinned on CUDA) that is
copied to the device once, non-blocking, as dstp/worker/step_inputs.py does for the
model's inputs. The parts come back as views of the device copy, in their own dtype
and shape: a float is rounded to float32 on the device exactly as
``torch.tensor(value, dtype=torch.float32)`` rounds it on the host.
"""

from __future__ import annotations

import threading

import torch

_LOCAL = threading.local()  # each thread its own host buffers (an engine loop per thread)


class Packer:
    """Collects a step's parts on the host, then uploads them in one copy."""

    def __init__(self) -> None:
        self._parts: dict[str, tuple[torch.Tensor, torch.dtype, tuple[int, ...], int]] = {}

    def ints(self, name: str, values: list[int] | torch.Tensor) -> None:
        host = torch.as_tensor(values, dtype=torch.long).reshape(-1)
        self._parts[name] = (host, torch.long, tuple(host.shape), host.numel())

    def floats(self, name: str, values: list[float]) -> None:
        host = torch.tensor(values, dtype=torch.float64)
        self._parts[name] = (host.view(torch.long), torch.float64, tuple(host.shape), host.numel())

    def words(self, name: str, values: torch.Tensor) -> None:
        """int32 words of any shape (llguidance's [rows, words] bitmask)."""
        flat = values.to(torch.int32).reshape(-1)
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        self._parts[name] = (
            flat.view(torch.long),
            torch.int32,
            tuple(values.shape),
            values.numel(),
        )

    @property
    def numel(self) -> int:
        """The int64 words the upload will carry."""
        return sum(host.numel() for host, *_ in self._parts.values())

    def upload(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every part on ``device``, by name, after one host-to-device copy (none if empty)."""
        if not self._parts:
            return {}
        sizes = [host.numel() for host, *_ in self._parts.values()]
        on_device = _uploader(device).upload([host for host, *_ in self._parts.values()])
        out, taken = {}, 0
        for (name, (_, dtype, shape, numel)), size in zip(self._parts.items(), sizes, strict=True):
            part = on_device[taken : taken + size]
            taken += size
            if dtype is not torch.long:
                part = part.view(dtype)[:numel]
            out[name] = part.view(shape)
        return out


class _Uploader:
    """Two host buffers used in turn; on CUDA pinned, and rewritten only once the copy that
    last read one has finished (an event), so the upload never blocks the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers = [torch.empty(0, dtype=torch.long)] * 2
        self._done: list[object | None] = [None, None]
        self._turn = 0

    def upload(self, parts: list[torch.Tensor]) -> torch.Tensor:
        total = sum(p.numel() for p in parts)
        buffer = self._host_buffer(total)
        torch.cat(parts, out=buffer[:total])
        on_device = buffer[:total].to(self.device, non_blocking=self.pinned)
        if self.pinned:
            done = torch.cuda.Event()
            done.record()
            self._done[self._turn] = done
            self._turn ^= 1
        return on_device

    def _host_buffer(self, numel: int) -> torch.Tensor:
        if not self.pinned:  # the "copy" is the buffer itself: views of it outlive the step
            return torch.empty(numel, dtype=torch.long)
        done = self._done[self._turn]
        if done is not None:
            done.synchronize()  # the copy that last read this buffer has finished
        buffer = self._buffers[self._turn]
        if buffer.numel() < numel:
            buffer = torch.empty(max(numel, 2 * buffer.numel()), dtype=torch.long, pin_memory=True)
            self._buffers[self._turn] = buffer
        return buffer


def _uploader(device: torch.device) -> _Uploader:
    uploaders = getattr(_LOCAL, "uploaders", None)
    if uploaders is None:
        uploaders = _LOCAL.uploaders = {}
    found = uploaders.get(device)
    if found is None:
        found = uploaders[device] = _Uploader(device)
    return found
