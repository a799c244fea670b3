"""One upload per step: the packed arrays come back intact, decode batches included."""

from __future__ import annotations

import torch

from dstp.worker.step_inputs import PackedUpload, StepUploader
from dstp.worker.step_plan import StepPlan


def _plan() -> StepPlan:
    # seq 0: 3-token prefill; seqs 1 and 2: one decode token each (contexts 17 and 5)
    lt = torch.long
    return StepPlan(
        input_ids=torch.tensor([4, 5, 6, 7, 8], dtype=lt),
        positions=torch.tensor([0, 1, 2, 16, 4], dtype=lt),
        slot_mapping=torch.tensor([0, 1, 2, 50, 68], dtype=lt),
        query_starts=torch.tensor([0, 3, 4, 5], dtype=lt),
        context_lens=torch.tensor([3, 17, 5], dtype=lt),
        block_tables=torch.tensor([[0, 0], [2, 3], [4, 0]], dtype=lt),
        sample_rows=torch.tensor([2, 3, 4], dtype=lt),
        copies=torch.zeros((0, 2), dtype=lt),
    )


def test_upload_carries_every_array():
    plan = _plan()
    uploader = StepUploader(torch.device("cpu"))
    inputs = uploader.upload(plan, block_size=16)
    assert torch.equal(inputs.input_ids, plan.input_ids)
    assert torch.equal(inputs.positions, plan.positions)
    assert torch.equal(inputs.slot_mapping, plan.slot_mapping)
    assert torch.equal(inputs.block_tables, plan.block_tables)
    assert torch.equal(inputs.sample_rows, plan.sample_rows)
    assert inputs.decode_rows.tolist() == [3, 4]
    assert inputs.decode_blocks.tolist() == [[2, 3], [4, 0]]  # two blocks hold 17 tokens
    assert inputs.decode_lens.tolist() == [17, 5]


def test_a_single_decode_token_is_a_decode_batch_of_one():
    plan = _plan()
    plan.query_starts = torch.tensor([0, 3, 5, 6])  # seq 1 now has two new tokens
    plan.input_ids = torch.arange(6)
    assert plan.batched_decode_seqs() == [2]
    inputs = StepUploader(torch.device("cpu")).upload(plan, block_size=16)
    assert inputs.decode_rows.tolist() == [5]
    assert inputs.decode_blocks.tolist() == [[4]]  # one block holds its 5 tokens
    assert inputs.decode_lens.tolist() == [5]


def test_no_decode_batch_without_decode_tokens():
    plan = _plan()
    plan.query_starts = torch.tensor([0, 3, 5, 7])
    plan.input_ids = torch.arange(7)
    assert plan.batched_decode_seqs() == []
    inputs = StepUploader(torch.device("cpu")).upload(plan, block_size=16)
    assert inputs.decode_rows is None and inputs.decode_blocks is None


def test_host_buffers_alternate_and_are_reused():
    uploader = StepUploader(torch.device("cpu"))
    plan = _plan()
    first = uploader.upload(plan, 16).input_ids
    second = uploader.upload(plan, 16).input_ids
    third = uploader.upload(plan, 16).input_ids
    assert first.data_ptr() != second.data_ptr()  # the next step never overwrites the last
    assert first.data_ptr() == third.data_ptr()  # and no buffer is allocated per step


def test_a_fresh_host_buffer_per_call_where_views_outlive_the_call():
    """The sampler's values: on a host device the upload is the buffer itself, and its
    views are read after the next step's upload, so each call gets its own."""
    packed = PackedUpload(torch.device("cpu"), fresh_on_host=True)
    parts = [torch.arange(5), torch.arange(3)]
    first, second = packed.upload(parts), packed.upload(parts)
    assert first.data_ptr() != second.data_ptr() and torch.equal(first, second)
    assert first.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
