"""The sampler's one upload per step: every per-row value in one packed host buffer.

Integers go in as they are, floats as their float64 bits and int32 words (grammar
bitmasks) two to an int64, all into one int64 host buffer (pinned on CUDA) that is
copied to the device once, non-blocking, by the same ``PackedUpload`` that sends the
model's inputs (dstp/worker/step_inputs.py). The parts come back as views of the device
copy, in their own dtype and shape: a float is rounded to float32 on the device exactly as
``torch.tensor(value, dtype=torch.float32)`` rounds it on the host.
"""

from __future__ import annotations

import threading

import torch

from dstp.worker.step_inputs import PackedUpload

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

    def floats32(self, name: str, values: list[float]) -> None:
        """Floats rounded to float32 on the host (as ``torch.tensor(v, dtype=torch.float32)``),
        two to a word: on the device they are a float32 view, no conversion op."""
        padded = list(values) + [0.0] * (len(values) % 2)
        host = torch.tensor(padded, dtype=torch.float32).view(torch.long)
        self._parts[name] = (host, torch.float32, (len(values),), len(values))

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


def _uploader(device: torch.device) -> PackedUpload:
    uploaders = getattr(_LOCAL, "uploaders", None)
    if uploaders is None:
        uploaders = _LOCAL.uploaders = {}
    found = uploaders.get(device)
    if found is None:
        found = uploaders[device] = PackedUpload(device, fresh_on_host=True)
    return found
