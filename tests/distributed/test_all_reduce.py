"""The TP group's all-reduce and gathers: right, and in shared memory whenever DeepSpeed offers it.

DeepSpeed's CPU shared-memory kernel sums bf16/fp16 only on CPUs with
AVX512BW; elsewhere it quietly sends them to gloo over TCP, which took
~0.6-2.9 ms per 4 KiB call on a 2-core VM against ~10 us in shared memory,
a third of a batch-1 decode step. dstp sums 16-bit tensors in fp32 there,
and gathers (the LM head's logits) by summing zero-padded parts.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.launcher import run_ranks

SHAPES = ((1, 5), (1, 2048), (128, 2048))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("all_reduce")
    for proc in run_ranks(2, ["tests/helpers/workers/all_reduce_paths.py", str(out)]):
        assert proc.returncode == 0, proc.stdout[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _inputs(rank: int, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * rank + shape[0])
    return torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sums_are_fp32_sums_rounded_once(ranks, dtype):
    for shape in SHAPES:
        want = (_inputs(0, dtype, shape).float() + _inputs(1, dtype, shape).float()).to(dtype)
        for rank in ranks:
            got = torch.tensor(rank["sums"][f"{str(dtype)[6:]}{list(shape)}"])
            assert torch.equal(got, want.float().flatten()), (dtype, shape)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_gathers_return_every_part_unchanged(ranks, dtype):
    for shape in SHAPES:
        key = f"{dtype}{list(shape)}"
        parts = [torch.tensor(r["gathers"][key]["part"]).view(shape) for r in ranks]
        assert torch.equal(
            torch.tensor(ranks[0]["gathers"][key]["driver"]), torch.cat(parts, -1).flatten()
        )
        assert ranks[1]["gathers"][key]["driver"] is None
        for rank in ranks:
            assert torch.equal(
                torch.tensor(rank["gathers"][key]["all"]), torch.cat(parts, 0).flatten()
            )


def test_every_float_dtype_stays_in_shared_memory(ranks):
    """No bf16/fp16/fp32 sum or gather reaches gloo when the shared-memory kernel is there."""
    for rank in ranks:
        assert rank["fast_all_reduce"], "DeepSpeed's shm all-reduce should be on for 2 local ranks"
        assert rank["gloo_calls"] == 0, f"{rank['gloo_calls']} all-reduces went over gloo"
