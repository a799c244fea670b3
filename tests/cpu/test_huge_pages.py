"""Weights collapsed onto 2 MiB pages after loading (dstp.cpu.huge_pages)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from dstp.cpu import huge_pages


def _huge_kib_at(address: int) -> int:
    """AnonHugePages (KiB) of the mapping that holds ``address``, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(part, 16) for part in head.split("-"))
                inside = low <= address < high
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def _collapse_supported() -> bool:
    """Whether this kernel has MADV_COLLAPSE (Linux 6.1+) for a throwaway buffer."""
    probe = torch.ones(4 * huge_pages.HUGE, dtype=torch.uint8)
    start, length = huge_pages.huge_page_span(probe)
    madvise = huge_pages._madvise()
    return madvise is not None and madvise(start, length, huge_pages.MADV_COLLAPSE) == 0


def test_span_is_the_whole_huge_pages_inside_the_storage():
    weight = torch.empty(3 * huge_pages.HUGE, dtype=torch.uint8)
    start, length = huge_pages.huge_page_span(weight[5:])  # a view: its storage counts
    base = weight.data_ptr()
    assert start % huge_pages.HUGE == 0 and length % huge_pages.HUGE == 0
    assert base <= start and start + length <= base + weight.numel()
    assert length >= 2 * huge_pages.HUGE
    assert huge_pages.huge_page_span(torch.empty(1000, dtype=torch.uint8)[:10]) is None


@pytest.mark.skipif(not _collapse_supported(), reason="kernel without MADV_COLLAPSE")
def test_a_weight_ends_on_huge_pages():
    weight = torch.randn(4 * huge_pages.HUGE // 2).bfloat16()  # touched: 4 KiB pages now
    start, length = huge_pages.huge_page_span(weight)
    assert huge_pages.collapse([weight, weight.view(-1, 2)]) == length  # the same storage once
    assert _huge_kib_at(start) >= length // 1024
    assert torch.equal(weight, weight.clone())  # contents kept


def test_switched_off_or_refused_changes_nothing(monkeypatch):
    weight = torch.randn(4 * huge_pages.HUGE // 2).bfloat16()
    monkeypatch.setenv(huge_pages.ENV_SWITCH, "0")
    assert huge_pages.collapse([weight]) == 0
    monkeypatch.delenv(huge_pages.ENV_SWITCH)

    def refuses(*args):
        ctypes.set_errno(22)
        return -1

    monkeypatch.setattr(huge_pages, "_madvise", lambda: refuses)
    assert huge_pages.collapse([weight]) == 0


def test_loading_collapses_every_parameter(monkeypatch, tmp_path):
    import dstp
    from tests.helpers.tiny_models import llama_config, save_random_model

    seen = []
    monkeypatch.setattr(huge_pages, "collapse", lambda tensors: seen.extend(tensors) or 0)
    path = save_random_model(llama_config(), tmp_path / "model")
    model = dstp.load(str(path), torch.bfloat16)
    assert {p.data_ptr() for p in seen} == {p.data_ptr() for p in model.parameters()}


def test_zeros_fault_in_on_huge_pages_unless_switched_off(monkeypatch):
    """The KV cache's allocation: advised before its zeros touch it (no collapse, no copy)."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = thp.read_text() if thp.exists() else "[never]"
    if "[never]" in mode:
        pytest.skip("transparent huge pages are off on this host")
    values = 20 * huge_pages.HUGE // 2  # 40 MiB: past malloc's largest heap block, its own mapping
    buffer = huge_pages.zeros((values,), torch.bfloat16)
    start, length = huge_pages.huge_page_span(buffer)
    assert not buffer.any() and buffer.dtype == torch.bfloat16
    assert _huge_kib_at(start) >= length // 1024
    monkeypatch.setenv(huge_pages.ENV_SWITCH, "0")
    plain = huge_pages.zeros((values,), torch.bfloat16)
    assert not plain.any()
    if "[madvise]" in mode:  # with "always" every large buffer gets huge pages anyway
        assert _huge_kib_at(huge_pages.huge_page_span(plain)[0]) == 0


def test_the_cpu_kv_cache_is_allocated_on_huge_pages(monkeypatch):
    from dstp.worker import kv_cache

    seen = []
    monkeypatch.setattr(
        huge_pages,
        "zeros",
        lambda shape, dtype: seen.append(shape) or torch.zeros(shape, dtype=dtype),
    )
    shape = kv_cache.CacheShape(
        num_layers=2, local_kv_heads=2, k_head_dim=8, v_head_dim=8, block_size=4,
        dtype=torch.bfloat16,
    )  # fmt: skip
    cache = kv_cache.PagedKVCache(shape, num_blocks=3, device=torch.device("cpu"))
    assert seen == [(2, 2, 12, 8), (2, 2, 12, 8)] and not cache.keys.any()
