"""The GPU path's sync discipline, checked on CPU: real TP=2 engine steps under a counter.

On a GPU, a scalar read (``.item()``, ``bool(t)``), a data-dependent shape
(``nonzero``) or a tensor built from a Python list inside the forward makes
the host wait for the device, per layer. A TorchDispatchMode sees the same
ops on CPU, so this test guards the device path without a device: the
forward has none, and a step has a small fixed number (on host arrays),
whatever the batch and the depth.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.launcher import run_ranks
from tests.helpers.tiny_models import llama_config, save_random_model

PROMPTS = [
    list(range(3, 40)),  # chunked over two steps (continuation with a prefix)
    [5, 6, 7],
    [9, 8, 7, 6, 5],
    [11, 12],
    [13] * 9,
]
MAX_STEP_SYNCS = 2  # the decode batch's index and width, both on host arrays


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    root = tmp_path_factory.mktemp("syncs")
    models = {}
    for layers in (2, 4):
        config = llama_config(
            num_attention_heads=8, num_key_value_heads=2, vocab_size=256, num_hidden_layers=layers
        )
        models[f"layers{layers}"] = str(save_random_model(config, root / f"l{layers}"))
    job = root / "job.json"
    job.write_text(json.dumps({"models": models, "prompts": PROMPTS}))
    for proc in run_ranks(2, ["tests/helpers/workers/sync_count.py", str(job), str(root)]):
        assert proc.returncode == 0, proc.stdout[-3000:]
    return {
        (name, rank): json.loads((root / f"{name}.rank{rank}.json").read_text())
        for name in models
        for rank in range(2)
    }


def test_forward_reads_nothing_back(counts):
    for (name, rank), steps in counts.items():
        assert len(steps) > 5, (name, rank)
        for step in steps:
            in_forward = {k: v for k, v in step.items() if k.startswith("forward:")}
            assert not in_forward, f"{name} rank {rank}: host syncs inside the forward {step}"


def test_step_syncs_are_few_and_fixed(counts):
    for (name, rank), steps in counts.items():
        totals = [sum(v for k, v in s.items() if k.startswith("step:")) for s in steps]
        assert max(totals) <= MAX_STEP_SYNCS, f"{name} rank {rank}: {steps}"
    # the same schedule on a deeper model costs exactly the same syncs per step
    assert counts[("layers2", 0)] == counts[("layers4", 0)]
    assert counts[("layers2", 1)] == counts[("layers4", 1)]


def test_batched_decode_steps_were_counted(counts):
    steps = counts[("layers2", 0)]
    assert any(s["tokens"] == len(PROMPTS) for s in steps), "no step decoded the whole batch"
    assert any(s["tokens"] > len(PROMPTS) for s in steps), "no prefill step"
    assert torch.tensor([s["tokens"] for s in steps]).sum() > 0
