"""The checkpoint reader returns exactly what safetensors returns, and maps nothing."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dstp.model import loading
from dstp.model.loading import Checkpoint

TENSORS = {
    "w_bf16": torch.randn(37, 29).to(torch.bfloat16),
    "w_f32": torch.randn(11, 64),
    "w_f16": torch.randn(8, 5).to(torch.float16),
    "b": torch.randn(29),
    "ids": torch.arange(12, dtype=torch.int64),
    "mask": torch.rand(6) > 0.5,
    "scalar": torch.tensor(3.5),
    "experts": torch.randn(4, 6, 10),
}

KEYS = [
    slice(None),
    slice(3, 17),
    (slice(2, 9), slice(None)),
    (slice(None), slice(4, 13)),
    (slice(5, 30), slice(1, 2)),
    (slice(None), slice(0, 0)),
    (slice(None), slice(None, None, 2)),  # a step: safetensors' path
    (slice(1, 3), slice(None), slice(2, 7)),  # an N-D column slice: safetensors' path
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_file(TENSORS, str(folder / "model.safetensors"))
    return folder


def _applicable(key, ndim: int) -> bool:
    return len(key if isinstance(key, tuple) else (key,)) <= ndim


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_slices_match_safetensors(checkpoint, name):
    ckpt = Checkpoint(checkpoint)
    handle = ckpt.get(name)
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        reference = f.get_slice(name)
        if TENSORS[name].dim() == 0:
            assert torch.equal(handle[()], TENSORS[name])
            return
        for key in KEYS:
            if not _applicable(key, TENSORS[name].dim()):
                continue
            got, want = handle[key], reference[key]
            assert got.dtype == want.dtype and got.shape == want.shape, (name, key)
            assert torch.equal(got, want), (name, key)


def test_column_slice_crosses_bounce_buffer_reads(checkpoint, monkeypatch):
    monkeypatch.setattr(loading, "BOUNCE_BYTES", 3 * 29 * 2)  # three rows per read
    got = Checkpoint(checkpoint).get("w_bf16")[:, 7:20]
    assert torch.equal(got, TENSORS["w_bf16"][:, 7:20])


def test_reads_map_nothing(checkpoint, monkeypatch):
    """The fast path never opens the file through safetensors (no mmap of the file)."""
    ckpt = Checkpoint(checkpoint)

    def refuse(*args, **kwargs):
        raise AssertionError("safe_open used for a plain slice")

    monkeypatch.setattr(loading, "safe_open", refuse)
    assert torch.equal(ckpt.get("w_f32")[:, 10:20], TENSORS["w_f32"][:, 10:20])
    assert torch.equal(ckpt.get("b")[4:9], TENSORS["b"][4:9])


def test_truncated_file_names_the_tensor(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(loading.CheckpointError, match="'w'"):
        ckpt.get("w")[:]


@pytest.mark.parametrize(
    "name,key,dtype",
    [
        ("w_bf16", (slice(3, 20), slice(None)), torch.bfloat16),  # one pread
        ("w_bf16", (slice(None), slice(4, 13)), torch.bfloat16),  # column slice
        ("w_f32", (slice(2, 9), slice(None)), torch.bfloat16),  # cast while streaming
        ("b", slice(5, 20), torch.float32),
        ("experts", (slice(1, 3),), torch.float32),  # N-D rows
    ],
)
def test_read_into_fills_the_destination(checkpoint, name, key, dtype, monkeypatch):
    monkeypatch.setattr(loading, "BOUNCE_BYTES", 200)  # several reads per slice
    want = TENSORS[name][key].to(dtype)
    dest = torch.full_like(want, -7)
    Checkpoint(checkpoint).get(name).read_into(dest, key)
    assert torch.equal(dest, want)


def test_read_into_a_strided_destination(checkpoint):
    """Fused parameters load each part into a narrowed (strided) view of the shard."""
    dest = torch.zeros(37, 20, dtype=torch.bfloat16)
    Checkpoint(checkpoint).get("w_bf16").read_into(
        dest.narrow(1, 5, 10), (slice(None), slice(2, 12))
    )
    assert torch.equal(dest[:, 5:15], TENSORS["w_bf16"][:, 2:12])
    assert not dest[:, :5].any() and not dest[:, 15:].any()


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def _casts(dtype: torch.dtype) -> list[torch.dtype]:
    if not dtype.is_floating_point:
        return [dtype]
    return [dtype, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_staged_reads_equal_direct_reads(checkpoint, name, monkeypatch):
    """The device path (host staging buffers, then a copy) gives the direct path's bytes."""
    handle = Checkpoint(checkpoint).get(name)
    cases = []
    for key in [(), *KEYS]:  # () reads the whole tensor, 0-d ones included
        if not _applicable(key, TENSORS[name].dim()):
            continue
        for dtype in _casts(TENSORS[name].dtype):
            direct = torch.zeros_like(TENSORS[name][key], dtype=dtype)
            handle.read_into(direct, key)
            cases.append((key, dtype, direct))
    monkeypatch.setattr(loading, "FORCE_HOST_STAGING", True)
    monkeypatch.setattr(loading, "STAGING_BYTES", 48)  # many buffer turns per tensor
    monkeypatch.setattr(loading, "_STAGING", None)
    for key, dtype, direct in cases:
        staged = torch.full_like(direct, 7)
        handle.read_into(staged, key)
        assert torch.equal(_bytes(staged), _bytes(direct)), (key, dtype)
    buffers = [b for b in loading._STAGING._buffers if b is not None]
    assert len(buffers) == 2  # two buffers, reused for every read
    loading.finish_staged_reads()
    assert loading._STAGING is None


def test_staged_read_into_a_strided_destination(checkpoint, monkeypatch):
    monkeypatch.setattr(loading, "FORCE_HOST_STAGING", True)
    monkeypatch.setattr(loading, "STAGING_BYTES", 64)
    monkeypatch.setattr(loading, "_STAGING", None)
    dest = torch.zeros(37, 20, dtype=torch.float32)
    Checkpoint(checkpoint).get("w_bf16").read_into(
        dest.narrow(1, 5, 10), (slice(None), slice(2, 12))
    )
    assert torch.equal(dest[:, 5:15], TENSORS["w_bf16"][:, 2:12].float())
    assert not dest[:, :5].any() and not dest[:, 15:].any()
    loading.finish_staged_reads()
